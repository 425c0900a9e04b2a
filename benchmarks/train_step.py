"""Training step time of the hybrid LongGen model vs the same model with every layer full.

Llama-2-7B layer shapes (hidden 4096, 32 heads, FFN 11008) at reduced depth (default 6
layers: 2 full + 4 sparse), bf16, full activation recomputation, batch 1, one GPU, through the
real trainer (Megatron-Core schedules, DDP, optimizer). The vocabulary defaults to 8192: with
Llama's 32000, Megatron's loss keeps the fp32 logits of one 128K sequence, their softmax and
gradient (~44 GB), which do not fit one 80 GB GPU beside the optimizer; the vocabulary costs
both models the same. ``--linear-cross-entropy`` computes the loss with the chunked output
layer + cross-entropy (``--cross-entropy-fusion-impl linear``), which never holds them.
Prints one table; every ratio comes from this run.

    python benchmarks/train_step.py                       # 32K, 64K, 128K
    python benchmarks/train_step.py --seq-lengths 131072 --iters 3
    python benchmarks/train_step.py --vocab-size 32000 --linear-cross-entropy
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from megatron_longgen.training.arguments import parse_args
from megatron_longgen.training.trainer import Trainer

VARIANTS = {
    "full": ["--full-attention-placement", "all"],
    "hybrid attn_sink": ["--sparse-attention", "attn_sink", "--sink-tokens", "64",
                         "--sliding-window-size", "4096"],
    "hybrid block_sparse": ["--sparse-attention", "block_sparse", "--sparse-block-size", "64",
                            "--local-blocks", "16", "--vert-stride", "8", "--no-homo-head"],
}


def variant_flags(variant: str, num_layers: int) -> list:
    if variant == "full":
        return list(VARIANTS[variant])
    third = num_layers // 3  # the middle third full; an explicit list overrides placement "all"
    return ["--full-attention-layers", *map(str, range(third, 2 * third)), *VARIANTS[variant]]


LINEAR_CROSS_ENTROPY = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]


def step_flags(seq_length: int, variant: str, num_layers: int, vocab_size: int, iters: int,
               backend: str = "auto", linear_cross_entropy: bool = False) -> list:
    """Trainer flags of one timed configuration: Llama-2-7B layer shapes, bf16, full
    recomputation, batch 1, mock data."""
    return [
        "--model", "llama2-7b", "--num-layers", str(num_layers), "--device", "cuda",
        "--vocab-size", str(vocab_size),
        "--bf16", "--mock-data", "--seq-length", str(seq_length),
        "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", str(iters), "--log-interval", "1000000",
        "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", "1", "--lr", "1e-5", "--min-lr", "1e-6",
        "--core-attention-backend", backend,
        *variant_flags(variant, num_layers),
        *(LINEAR_CROSS_ENTROPY if linear_cross_entropy else []),
    ]


def measure(seq_length: int, variant: str, args) -> dict:
    flags = step_flags(seq_length, variant, args.num_layers, args.vocab_size,
                       args.warmup + args.iters, args.backend, args.linear_cross_entropy)
    trainer = Trainer(parse_args(flags))
    result = trainer.fit()
    times = result.step_times[args.warmup:]
    return {"step_s": statistics.median(times), "mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "full_layers": list(trainer.config.full_layer_indices)}


def measure_in_subprocess(seq_length: int, variant: str, args) -> dict:
    """Each configuration runs in a fresh process: no memory carried over, honest peaks."""
    cmd = [sys.executable, __file__, "--one", str(seq_length), variant,
           "--num-layers", str(args.num_layers), "--iters", str(args.iters),
           "--warmup", str(args.warmup), "--backend", args.backend,
           "--vocab-size", str(args.vocab_size),
           "--linear-cross-entropy" if args.linear_cross_entropy else "--no-linear-cross-entropy"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr:
        return {"oom": True}
    raise RuntimeError(f"{variant} at {seq_length} failed:\n{proc.stderr[-4000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--linear-cross-entropy", action=argparse.BooleanOptionalAction, default=False,
                        help="loss from the chunked output layer + cross-entropy (no whole logits)")
    parser.add_argument("--one", nargs=2, metavar=("SEQ", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        seq, variant = int(args.one[0]), args.one[1]
        print("RESULT " + json.dumps(measure(seq, variant, args)), flush=True)
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"{args.num_layers} Llama-2-7B-shaped layers ({args.num_layers // 3} full in the hybrid), "
          f"vocab {args.vocab_size}, loss: "
          f"{'linear cross-entropy (chunked)' if args.linear_cross_entropy else 'Megatron (whole logits)'}")
    rows = []
    for seq in args.seq_lengths:
        base = None
        for name in VARIANTS:
            t0 = time.time()
            r = measure_in_subprocess(seq, name, args)
            if r.get("oom"):
                rows.append((seq, name, None, None, None, None))
                print(f"{seq} {name}: out of memory", flush=True)
                continue
            base = r["step_s"] if name == "full" else base
            speedup = base / r["step_s"] if base else None
            rows.append((seq, name, r["step_s"], seq / r["step_s"], speedup, r["mem_gb"]))
            print(f"{seq} {name}: {r['step_s']:.3f} s/step, full layers {r['full_layers']} "
                  f"({time.time() - t0:.0f} s total)", flush=True)
    print()
    print(f"| seq len | model | step time (s) | tokens/s | speedup vs full | peak mem (GB) |")
    print(f"|---|---|---|---|---|---|")
    for seq, name, step, tps, speedup, mem in rows:
        fmt = lambda v, f: "OOM" if v is None else format(v, f)
        print(f"| {seq // 1024}K | {name} | {fmt(step, '.3f')} | {fmt(tps, ',.0f')} | "
              f"{fmt(speedup, '.2f')} | {fmt(mem, '.1f')} |")


if __name__ == "__main__":
    main()
