"""Inference memory and speed of the hybrid LongGen model vs the same model with every layer full.

Llama-2-7B shape (32 layers, hidden 4096, 32 heads, 32 KV heads, FFN 11008, vocab 32000),
random bf16 weights, the engine's fast path (prefill with the training attention kernels,
split-K decode replayed as CUDA graphs). Per prompt length and batch: KV cache bytes, prefill
time and decode ms/token, for each hybrid pattern (a third of the layers full, in the middle)
and the all-full model, all measured in this one run; one table with the ratios to full.

    python benchmarks/inference.py                               # 16K-128K batch 1, 32K batch 4
    python benchmarks/inference.py --lengths 16384 32768 --json out.json
    python benchmarks/inference.py --device cpu                  # tiny smoke run (tests)

Budget on one H200: the all-full cache at 128K (or 4 x 32K) is 64 GB beside 13.5 GB of weights;
each model is built once and every cache is freed before the next one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

VARIANTS = {
    "full": dict(full_attention_placement="all"),
    "attn_sink": dict(sparse_attention="attn_sink", sink_tokens=64, sliding_window_size=4096),
    "block_sparse": dict(sparse_attention="block_sparse", sparse_block_size=64, local_blocks=16,
                         vert_stride=8, homo_head=False),
}
# The CPU smoke run: tiny shapes whose prompts still exceed the window and several blocks.
SMOKE_VARIANTS = {
    "full": dict(full_attention_placement="all"),
    "attn_sink": dict(sparse_attention="attn_sink", sink_tokens=4, sliding_window_size=16),
    "block_sparse": dict(sparse_attention="block_sparse", sparse_block_size=16, local_blocks=1,
                         vert_stride=2, homo_head=False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="prompt lengths at batch 1 (default 16K 32K 64K 128K; cpu: 48)")
    p.add_argument("--batch", type=int, default=None, help="the larger batch (default 4; cpu: 2)")
    p.add_argument("--batch-length", type=int, default=None,
                   help="prompt length of the larger batch (default 32K; cpu: 40); 0 skips it")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps")
    p.add_argument("--decode-warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk (projections, MLP)")
    p.add_argument("--warmup-length", type=int, default=None,
                   help="untimed prefill per model first (default 4096; cpu: 20)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    if args.lengths is None:
        args.lengths = [48] if cpu else [16384, 32768, 65536, 131072]
    if args.batch is None:
        args.batch = 2 if cpu else 4
    if args.batch_length is None:
        args.batch_length = 40 if cpu else 32768
    if args.warmup_length is None:
        args.warmup_length = 20 if cpu else 4096
    if cpu:
        args.decode_steps, args.decode_warmup, args.chunk_size = 2, 1, 16
    return args


def build_model(variant: str, device: str, max_length: int):
    from megatron_longgen.models.gpt import build_longgen_model
    from megatron_longgen.models.presets import get_preset, longgen_config

    torch.manual_seed(0)  # same weights for every variant: only the attention differs
    if device == "cpu":
        preset = "tiny"
        cfg = longgen_config(preset, use_cpu_initialization=True, **SMOKE_VARIANTS[variant])
    else:
        preset = "llama2-7b"
        cfg = longgen_config(preset, bf16=True, params_dtype=torch.bfloat16,
                             **VARIANTS[variant])
    return build_longgen_model(cfg, get_preset(preset).vocab_size, max_length).eval()


class Timer:
    """Wall time of GPU work with CUDA events (host time on CPU)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(True), torch.cuda.Event(True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


@torch.no_grad()
def measure(model, batch: int, length: int, args, decode: bool = True) -> dict:
    from megatron_longgen.inference.engine import InferenceEngine

    steps = args.decode_warmup + args.decode_steps
    engine = InferenceEngine(model, max_length=length + steps + 1, chunk_size=args.chunk_size,
                             attention="fast")
    vocab = model.output_layer.weight.shape[0]
    ids = torch.randint(0, vocab, (batch, length), device=args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with Timer(args.device) as t:
        cache, logits = engine.prefill(ids)
    prefill_s = t.seconds
    kv_bytes = cache.nbytes()
    del ids
    tokens = logits.argmax(-1)
    if not decode:
        del engine, cache, logits, tokens
        free(args.device)
        return {}
    for _ in range(args.decode_warmup):  # eager step (compile, tune), capture, one replay
        tokens = engine.decode(cache, tokens).argmax(-1)
    with Timer(args.device) as t:
        for _ in range(args.decode_steps):
            tokens = engine.decode(cache, tokens).argmax(-1)
    row = dict(batch=batch, length=length, kv_gb=kv_bytes / 2**30, prefill_s=prefill_s,
               decode_ms=t.seconds * 1e3 / args.decode_steps,
               peak_gb=torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0)
    del engine, cache, logits, tokens
    free(args.device)
    return row


def free(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def table(rows) -> str:
    full = {(r["batch"], r["length"]): r for r in rows if r["variant"] == "full"}
    head = (f"{'variant':<13} {'batch':>5} {'length':>7} {'KV GB':>8} {'prefill s':>9} "
            f"{'decode ms':>9} {'peak GB':>8} | {'KV/full':>7} {'prefill x':>9} {'decode x':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        f = full.get((r["batch"], r["length"]))
        ratios = ("" if f is None else
                  f"{r['kv_gb'] / f['kv_gb']:>7.1%} {f['prefill_s'] / r['prefill_s']:>8.2f}x "
                  f"{f['decode_ms'] / r['decode_ms']:>7.2f}x")
        lines.append(f"{r['variant']:<13} {r['batch']:>5} {r['length']:>7} {r['kv_gb']:>8.3f} "
                     f"{r['prefill_s']:>9.3f} {r['decode_ms']:>9.2f} {r['peak_gb']:>8.1f} | {ratios}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    from megatron_longgen.parallel.initialize import initialize_parallel

    initialize_parallel(device=args.device, seed=1234)
    shapes = [(1, n) for n in args.lengths]
    if args.batch_length:
        shapes.append((args.batch, args.batch_length))
    longest = max(n for _, n in shapes + [(1, args.warmup_length)])
    max_length = longest + args.decode_warmup + args.decode_steps + 1
    rows = []
    for variant in args.variants:
        model = build_model(variant, args.device, max_length)
        # Compile the prefill kernels once per model, outside the timings (no per-length tuning).
        measure(model, 1, args.warmup_length, args, decode=False)
        for batch, length in shapes:
            row = dict(variant=variant, **measure(model, batch, length, args))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del model
        free(args.device)
    # Full first in the table of each shape, then the hybrids with their ratios.
    rows.sort(key=lambda r: (r["batch"], r["length"], r["variant"] != "full", r["variant"]))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
