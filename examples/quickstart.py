"""LongGen in miniature, on CPU, with nothing downloaded.

1. Train a small sentencepiece tokenizer on the bundled text and preprocess that text into a
   Megatron indexed dataset.
2. Train a tiny Llama-style model at short context on that text mixed with passkey-retrieval
   documents (a one-digit key after a "#" mark, in the passkey test's classic filler, at any
   distance from the question), in the hybrid's layout (--base-placement all: every layer
   full, like the pretrained model LongGen starts from; at this size that base hands its lookup
   to the full third reliably on some seeds only, see docs/evaluation.md).
3. Extend it to a longer context (twice by default) with a raised RoPE base, from the same
   weights: as a LongGen hybrid (the middle third of the layers full, the rest sink + window)
   and with every layer sparse. A third extension keeps every layer full; it is scored as
   trained and with inference-time sink + window KV eviction (StreamingLLM: the prompt streams
   through the evicting cache), same sink and window.
4. Print loss and passkey accuracy at the long length, with the passkey farther back than the
   sparse window: only layers with full attention can read it directly. All four are scored by
   greedy generation on the same prompts; a heatmap (depth x model) is written as PNG.

    python examples/quickstart.py                 # about 13 minutes on 2 CPU cores
    python examples/quickstart.py --models hybrid sparse --seed 1
    python examples/quickstart.py --device cuda
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_longgen.utils.accelerators import quiet_fallback_warnings  # noqa: E402

quiet_fallback_warnings()  # before Megatron-Core is imported; each stage's banner names them

from megatron.core.utils import unwrap_model  # noqa: E402

from megatron_longgen.data.datasets import DataConfig, build_train_valid_datasets  # noqa: E402
from megatron_longgen.data.mixture import MixtureDataset  # noqa: E402
from megatron_longgen.data.passkey import DEFAULT_FILLER, PASSKEY_FORMATS, PasskeyTrainingSet  # noqa: E402
from megatron_longgen.data.preprocess import PreprocessConfig, format_report, preprocess  # noqa: E402
from megatron_longgen.data.tokenizer import build_tokenizer, train_sentencepiece  # noqa: E402
from megatron_longgen.eval import plots  # noqa: E402
from megatron_longgen.eval.passkey import passkey_accuracy_generated  # noqa: E402
from megatron_longgen.eval.runner import EvictingEngine  # noqa: E402
from megatron_longgen.inference.engine import InferenceEngine  # noqa: E402
from megatron_longgen.parallel.initialize import destroy_parallel  # noqa: E402
from megatron_longgen.training.arguments import parse_args  # noqa: E402
from megatron_longgen.training.trainer import Trainer  # noqa: E402

CORPUS = sorted(glob.glob(str(REPO / "examples" / "data" / "*.txt")) + glob.glob(str(REPO / "examples" / "data" / "*.jsonl")))
# --models: the extensions, each (row name, --full-attention-placement).
VARIANTS = {"hybrid": ("LongGen hybrid (1/3 full)", "middle"), "sparse": ("every layer sparse", "none"),
            "full": ("every layer full", "all")}
MODEL_FLAGS = ["--model", "tiny", "--hidden-size", "128", "--num-attention-heads", "4",
               "--num-query-groups", "2", "--ffn-hidden-size", "352"]


def step(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def filler_text(kind: str, limit_chars: int = 200_000) -> str:
    """The text around the needle: the passkey test's classic repeated sentences (a few tokens
    each, so the needle can sit at any distance from the question even at the short length), or
    the bundled essays (sentences of 20-40 tokens: at 64 tokens none fits beside the needle)."""
    if kind == "classic":
        return DEFAULT_FILLER
    with open(REPO / "examples" / "data" / "essays.txt") as fh:
        return " ".join(fh.read(limit_chars).split())


def training_set(tokenizer, blend_path, seq_length, iters, batch, seed, args, valid=False):
    """Text windows from the indexed dataset mixed 1:N with passkey items."""
    data = DataConfig(seq_length=seq_length, global_batch_size=batch, train_iters=iters,
                      blend_path=blend_path, seed=seed, split="90,10,0",
                      eval_iters=2 if valid else 0, eval_interval=iters if valid else None)
    text_train, text_valid = build_train_valid_datasets(data, tokenizer)
    passkeys = PasskeyTrainingSet(tokenizer, seq_length, num_samples=iters * batch, seed=seed,
                                  filler_text=filler_text(args.passkey_filler), fmt=PASSKEY_FORMATS[args.passkey_format],
                                  loss_on_filler=args.loss_on_filler)
    return MixtureDataset([text_train, passkeys], [1, args.passkey_ratio], iters * batch), text_valid


def run_stage(flags, datasets, eod):
    trainer = Trainer(parse_args(flags), datasets=datasets, eod_id=eod)
    result = trainer.fit()
    return trainer, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where every stage runs")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "quickstart"),
                        help="tokenizer, dataset, checkpoints and results (emptied first)")
    parser.add_argument("--short-length", type=int, default=64, help="tokens per sequence of the short stage")
    parser.add_argument("--long-length", type=int, default=128, help="tokens per sequence after the extension")
    parser.add_argument("--window", type=int, default=16, help="sliding window of the sparse layers")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens of the sparse layers")
    parser.add_argument("--base-iters", type=int, default=2000, help="steps of the short-context stage")
    parser.add_argument("--extend-iters", type=int, default=400, help="steps of each extension")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--base-lr", type=float, default=3e-3,
                        help="peak learning rate of the short-context stage (cosine to a tenth)")
    parser.add_argument("--extend-lr", type=float, default=1e-3,
                        help="peak learning rate of each extension (cosine to a tenth)")
    parser.add_argument("--eval-samples", type=int, default=64, help="passkey prompts scored per model")
    parser.add_argument("--passkey-ratio", type=int, default=50,
                        help="passkey items per text window in the training mixture")
    parser.add_argument("--passkey-format", default="compact", choices=sorted(PASSKEY_FORMATS),
                        help="compact: a one-digit key after a '#' mark in an 18-token needle and "
                             "question (one token to retrieve); marked: the same key in the 45-token "
                             "standard wording, which leaves no room for filler at 64 tokens")
    parser.add_argument("--passkey-filler", default="classic", choices=("classic", "essays"),
                        help="text around the needle, in training and evaluation: classic (the "
                             "passkey test's repeated short sentences) or essays (the bundled text)")
    parser.add_argument("--base-placement", default="middle", choices=("all", "middle"),
                        help="full-attention layers of the short-context stage: middle (the hybrid's "
                             "layout from the start: the lookup is learned in the layers that stay "
                             "full) or all (a full-attention base, as in the paper)")
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which extensions to train and score (full: also with KV eviction)")
    parser.add_argument("--seed", type=int, default=0,
                        help="shifts every training random stream (initialisation, data order, passkey "
                             "items); the evaluation prompts stay the same")
    parser.add_argument("--loss-on-filler", action="store_true",
                        help="passkey items also train on their filler text, not only the answer")
    args = parser.parse_args()
    started = time.time()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    total = 3 + len(args.models)

    step(1, total, f"tokenizer and indexed dataset from {len(CORPUS)} bundled files")
    tok_path = train_sentencepiece(CORPUS, str(work / "tokenizer"), vocab_size=512)
    tokenizer = build_tokenizer(tok_path)
    report = preprocess(PreprocessConfig(
        inputs=[(Path(p).stem, p) for p in CORPUS], output_prefix=str(work / "corpus"),
        tokenizer_model=tok_path, text_document="paragraph"))
    print(format_report(report), flush=True)
    blend_path = str(work / "corpus_blend.json")
    vocab = ["--vocab-size", str(tokenizer.vocab_size)]
    common = MODEL_FLAGS + vocab + ["--device", args.device, "--micro-batch-size", str(args.batch),
                                    "--global-batch-size", str(args.batch), "--log-interval", "25",
                                    "--seed", str(1234 + args.seed)]

    base_layout = {"all": "every layer full", "middle": "LongGen hybrid layout"}[args.base_placement]
    step(2, total, f"short-context training at {args.short_length} tokens, {base_layout}")
    base_data, _ = training_set(tokenizer, blend_path, args.short_length, args.base_iters, args.batch,
                                1 + args.seed, args)
    run_stage(common + [
        "--seq-length", str(args.short_length), "--train-iters", str(args.base_iters),
        "--lr", str(args.base_lr), "--min-lr", str(args.base_lr / 10), "--lr-warmup-iters", str(min(10, args.base_iters // 5)),
        "--full-attention-placement", args.base_placement, "--sparse-attention", "attn_sink",
        "--sink-tokens", str(args.sinks), "--sliding-window-size", str(args.window),
        "--rotary-base", "10000", "--save", str(work / "base")], (base_data, None), tokenizer.eod)
    destroy_parallel()

    long_data, long_valid = training_set(tokenizer, blend_path, args.long_length, args.extend_iters,
                                         args.batch, 2 + args.seed, args, valid=True)
    far = PasskeyTrainingSet(tokenizer, args.long_length, args.eval_samples, seed=99,
                             filler_text=filler_text(args.passkey_filler), depth_range=(0.0, 0.5),
                             fmt=PASSKEY_FORMATS[args.passkey_format])
    far_depths = [far.sample(i).depth for i in range(args.eval_samples)]
    rotary_base = 10000 * args.long_length // args.short_length
    results = {}
    variants = [VARIANTS[m] for m in args.models]
    for n, (name, placement) in enumerate(variants, start=3):
        step(n, total, f"extension to {args.long_length} tokens as {name}: sink {args.sinks} + "
                       f"window {args.window}, RoPE base {rotary_base}")
        trainer, result = run_stage(common + [
            "--seq-length", str(args.long_length), "--train-iters", str(args.extend_iters),
            "--lr", str(args.extend_lr), "--min-lr", str(args.extend_lr / 10), "--lr-warmup-iters", str(min(10, args.extend_iters // 5)),
            "--full-attention-placement", placement, "--sparse-attention", "attn_sink",
            "--sink-tokens", str(args.sinks), "--sliding-window-size", str(args.window),
            "--rotary-base", str(rotary_base), "--eval-interval", str(args.extend_iters),
            "--eval-iters", "2", "--load", str(work / "base"), "--finetune",
            "--save", str(work / placement)], (long_data, long_valid), tokenizer.eod)
        model = unwrap_model(trainer.model[0])
        losses = {"valid_loss": result.eval_losses.get(args.extend_iters),
                  "train_loss": result.losses[max(result.losses)]}
        engines = {name: InferenceEngine(model, args.long_length)}
        if placement == "all":
            engines[f"{name} + KV eviction"] = EvictingEngine(model, args.long_length, args.sinks, args.window)
        for label, engine in engines.items():
            results[label] = {**losses, **passkey_accuracy_generated(engine, far, range(args.eval_samples)),
                              "per_item_depth": far_depths}
            print(f"{label}: passkey exact match {100 * results[label]['exact']:.1f}%", flush=True)
        destroy_parallel()

    step(total, total, "results")
    min_distance = args.long_length // 2 - 40
    print(f"context {args.short_length} -> {args.long_length} tokens; passkey in the first half of "
          f"the context, at least ~{min_distance} tokens before the question (window {args.window})\n")
    print("| model | text valid loss | passkey exact match | passkey digit accuracy |")
    print("|---|---|---|---|")
    for name, r in results.items():
        loss = f"{r['valid_loss']:.3f}" if r["valid_loss"] is not None else "n/a"
        print(f"| {name} | {loss} | {100 * r['exact']:.1f}% | {100 * r['token_accuracy']:.1f}% |")
    print("\nchance: 1 in 9 for the one-digit key, 10% per digit otherwise. Full-attention "
          "layers read any earlier token directly; the all-sparse model and the evicted cache must "
          "pass the passkey through windows layer by layer.")
    write_heatmap(work / "passkey_heatmap.png", results, far.depth_range, args.long_length)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults in {work / 'results.json'}, heatmap in {work / 'passkey_heatmap.png'}, "
          f"checkpoints in {work} ({time.time() - started:.0f} s)")


def write_heatmap(path: Path, results: dict, depth_range, length: int, bins: int = 5):
    """Exact match by needle depth (rows: ``bins`` equal bins over ``depth_range``, top = the
    start of the context) and model (columns), from each model's per-item depths and scores."""
    lo, hi = depth_range
    edges = np.linspace(lo, hi, bins + 1)
    grid = np.full((bins, len(results)), np.nan)
    counts = np.zeros(bins, dtype=int)  # prompts per bin: every model answers the same ones
    for c, r in enumerate(results.values()):
        rows = np.minimum(((np.asarray(r["per_item_depth"]) - lo) / (hi - lo) * bins).astype(int), bins - 1)
        exact = np.asarray(r["per_item_exact"], dtype=float)
        counts = np.bincount(rows, minlength=bins)
        for b in range(bins):
            if counts[b]:
                grid[b, c] = exact[rows == b].mean()
    labels = [f"{100 * a:g}-{100 * b:g}%\n{n} prompt{'' if n == 1 else 's'}"
              for a, b, n in zip(edges, edges[1:], counts)]
    return plots.depth_by_model_heatmap(str(path), labels, list(results), grid,
                                        title=f"Passkey at {length} tokens: exact match by depth and model")


if __name__ == "__main__":  # required: checkpoint saving starts worker processes
    main()
