"""Serving cost of the hybrid model vs the same model all-full: KV cache memory, prefill time,
decode time per token, and decode against its memory-bandwidth floor. One process, one GPU,
every ratio from one run. Prints a table.

    python benchmarks/inference.py                          # 128K batch 1, 32K batch 4
    python benchmarks/inference.py --lengths 16384 32768 65536 131072
    python benchmarks/inference.py --device cpu --tiny --lengths 64 --batch-lengths 48
                                                            # a smoke run on CPU

Llama-2-7B shape (32 layers, hidden 4096, 32 heads, FFN 11008, vocab 32000) with random bf16
weights; hybrids keep the middle third of the layers full. AttnSink: sink 64, window 4096.
BlockSparse: block 64, 16 local blocks, vertical stride 8, heterogeneous heads. The engine's
fast path: prefill with the training kernels (SDPA causal for full layers, our Triton kernel
for sparse ones) over the whole prompt, decode with the split-K kernel over the pattern-sized
caches replayed as a CUDA graph. Prefill is timed on the second prompt of a length (the
first also builds the kernels' tile lists; its time is in the JSON as ``prefill_cold_s``).
KV memory counts K and V (slot positions add 1.6%). The
all-full model at 128K needs ~80 GB (13.5 GB weights + 64 GB cache): use a 141 GB H200.

The bandwidth model: a decode step must read every weight the model reads for it once (every
layer's, the norms, the whole output layer, one embedding row per sequence) and every K/V its
caches hold (``KVCache.nbytes``: a full layer's cache is allocated for the prompt plus the
generated tokens, the sparse ones hold exactly what they read). Those bytes over the GPU's
streaming read bandwidth, measured here as a sum over a 4 GiB bf16 tensor (a reduction reads
only; a copy would also write), are the step's floor; ``x floor`` is the measured time over it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_longgen.inference import decode_ops  # noqa: E402
from megatron_longgen.inference.engine import InferenceEngine  # noqa: E402
from megatron_longgen.models.gpt import build_longgen_model  # noqa: E402
from megatron_longgen.models.presets import get_preset, longgen_config  # noqa: E402
from megatron_longgen.parallel.initialize import initialize_parallel  # noqa: E402

VARIANTS = {
    "full": dict(full_attention_placement="all"),
    "hybrid attn_sink": dict(sparse_attention="attn_sink", sink_tokens=64, sliding_window_size=4096),
    "hybrid block_sparse": dict(sparse_attention="block_sparse", sparse_block_size=64,
                                local_blocks=16, vert_stride=8, homo_head=False),
}
# The CPU smoke run: the tiny model, patterns scaled down so prompts exceed the window.
TINY_VARIANTS = {
    "full": dict(full_attention_placement="all"),
    "hybrid attn_sink": dict(sparse_attention="attn_sink", sink_tokens=4, sliding_window_size=32),
    "hybrid block_sparse": dict(sparse_attention="block_sparse", sparse_block_size=16,
                                local_blocks=2, vert_stride=4, homo_head=False),
}

_START = time.time()


def say(*args):
    print(f"[{time.time() - _START:5.0f}s]", *args, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(args, variant: str, max_length: int):
    torch.manual_seed(0)
    if args.tiny:
        cfg = longgen_config("tiny", **TINY_VARIANTS[variant])
        vocab = get_preset("tiny").vocab_size
    else:
        cfg = longgen_config("llama2-7b", params_dtype=torch.bfloat16, bf16=True,
                             rotary_base=500000.0, **VARIANTS[variant])
        vocab = get_preset("llama2-7b").vocab_size
    model = build_longgen_model(cfg, vocab, max_length).to(args.device).eval()
    return model, vocab


def read_bandwidth(device, gib: float = 4.0, reps: int = 20) -> float:
    """Streaming read bandwidth in bytes/s: the best of ``reps`` sums over ``gib`` GiB of bf16."""
    x = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for i in range(reps + 2):  # the first two warm up
        sync(device)
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best


def weight_bytes_read(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the input
    embedding, of which it reads one row per sequence (a tied output layer reads it whole)."""
    embedding = model.embedding.word_embeddings.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.share_embeddings_and_output_weights:
        total -= (embedding.shape[0] - batch) * embedding.shape[1] * embedding.element_size()
    return total


def measure(engine, vocab: int, batch: int, length: int, steps: int, device) -> dict:
    """Prefill ``batch`` random prompts of ``length`` tokens, then decode ``steps`` tokens."""
    prompts = torch.randint(0, vocab, (batch, length), device=device)
    times = []
    for _ in range(2):  # the first call at a length also builds the kernels' tile lists
        cache = logits = None  # a 128K full cache does not fit twice
        sync(device)
        t0 = time.perf_counter()
        cache, logits = engine.prefill(prompts)
        sync(device)
        times.append(time.perf_counter() - t0)
    prefill_s, prefill_cold_s = times[1], times[0]
    tokens = logits.argmax(-1)
    for _ in range(2):  # eager (compiles and tunes the kernels), then graph capture
        tokens = engine.decode(cache, tokens).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = engine.decode(cache, tokens).argmax(-1)
    sync(device)
    decode_ms = (time.perf_counter() - t0) / steps * 1e3
    by_kind = cache.nbytes_by_kind()
    result = dict(prefill_s=prefill_s, prefill_cold_s=prefill_cold_s, decode_ms=decode_ms,
                  kv_bytes=cache.nbytes(), kv_by_kind=by_kind,
                  weight_bytes=weight_bytes_read(engine.model, batch))
    del cache, logits
    engine._fast_decoder = None  # its graph and buffers hold the cache
    return result


def run(args) -> list:
    device = torch.device(args.device)
    bandwidth = read_bandwidth(device, gib=4.0 if device.type == "cuda" else 1 / 16)
    say(f"streaming read bandwidth {bandwidth / 1e12:.3f} TB/s")
    variants = [v for v in (TINY_VARIANTS if args.tiny else VARIANTS) if v in args.variants]
    configs = [(1, n) for n in args.lengths] + [(args.batch, n) for n in args.batch_lengths]
    longest = max(n for _, n in configs) + args.steps + 4
    rows = []
    for variant in variants:
        model, vocab = build(args, variant, longest)
        say(f"{variant}: model built")
        for batch, length in configs:
            engine = InferenceEngine(model, max_length=length + args.steps + 4,
                                     chunk_size=args.chunk_size, attention=args.attention)
            if not rows or rows[-1]["model"] != variant:  # warm-up: kernels compile here
                measure(engine, vocab, batch, min(length, args.warmup_length), 2, device)
            try:
                r = measure(engine, vocab, batch, length, args.steps, device)
            except torch.OutOfMemoryError:
                r = dict(oom=True)
            r.update(model=variant, batch=batch, length=length)
            if not r.get("oom"):
                add_floor(r, bandwidth)
            if device.type == "cuda":
                r["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            rows.append(r)
            del engine
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if r.get("oom"):
                say(f"{variant} batch {batch} length {length}: out of memory")
            else:
                say(f"{variant} batch {batch} length {length}: KV {r['kv_bytes'] / 2**30:.3g} GiB, "
                    f"prefill {r['prefill_s']:.3f} s (first {r['prefill_cold_s']:.3f} s), "
                    f"decode {r['decode_ms']:.2f} ms/token (floor {r['floor_ms']:.2f} ms, "
                    f"{r['decode_vs_floor']:.2f}x)")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def add_floor(row: dict, bandwidth: float) -> None:
    """The row's bytes per decode step, their time at ``bandwidth`` and the measured ratio."""
    row["read_bytes_per_step"] = row["weight_bytes"] + row["kv_bytes"]
    row["read_bandwidth_gbs"] = bandwidth / 1e9
    row["floor_ms"] = row["read_bytes_per_step"] / bandwidth * 1e3
    row["decode_vs_floor"] = row["decode_ms"] / row["floor_ms"]


def print_table(rows) -> None:
    full = {(r["batch"], r["length"]): r for r in rows if r["model"] == "full" and not r.get("oom")}
    print("\n| batch | prompt | model | KV cache (GiB) | KV vs full | prefill (s) | prefill speedup | "
          "decode (ms/token) | decode speedup | read/step (GB) | floor (ms) | x floor | "
          "floor speedup |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["batch"], r["length"])):
        head = f"| {r['batch']} | {r['length'] // 1024 if r['length'] >= 1024 else r['length']}" \
               f"{'K' if r['length'] >= 1024 else ''} | {r['model']} |"
        if r.get("oom"):
            print(head + " OOM | | | | | | | | | |")
            continue
        base = full.get((r["batch"], r["length"]))
        kv = f"{r['kv_bytes'] / base['kv_bytes']:.0%}" if base else "-"
        prefill = f"{base['prefill_s'] / r['prefill_s']:.2f}x" if base else "-"
        decode = f"{base['decode_ms'] / r['decode_ms']:.2f}x" if base else "-"
        floor = f"{base['floor_ms'] / r['floor_ms']:.2f}x" if base else "-"
        print(f"{head} {r['kv_bytes'] / 2**30:.3g} | {kv} | {r['prefill_s']:.3f} | {prefill} | "
              f"{r['decode_ms']:.2f} | {decode} | {r['read_bytes_per_step'] / 1e9:.3g} | "
              f"{r['floor_ms']:.2f} | {r['decode_vs_floor']:.2f}x | {floor} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[131072],
                   help="prompt lengths at batch 1")
    p.add_argument("--batch", type=int, default=4, help="the larger batch")
    p.add_argument("--batch-lengths", type=int, nargs="*", default=[32768],
                   help="prompt lengths at --batch")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps")
    p.add_argument("--chunk-size", type=int, default=8192, help="prefill chunk of the MLP/QKV")
    p.add_argument("--warmup-length", type=int, default=8192)
    p.add_argument("--device", default="cuda")
    p.add_argument("--attention", default="auto", choices=["auto", "fast", "exact"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="the tiny model (CPU smoke run)")
    p.add_argument("--json", default=None, help="write the rows here (after every row)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no GPU: pass --device cpu --tiny for the smoke run")
    initialize_parallel(device=args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    say(f"{name}, torch {torch.__version__}, {'tiny' if args.tiny else 'Llama-2-7B shape'}")
    rows = run(args)
    for (product, weight, shape, _, _), (kernel, module) in decode_ops.GEMV_TIMINGS.items():
        say(f"decode {product} {list(weight)} x {list(shape)}: gemv kernel {kernel:.1f} us, "
            f"module {module:.1f} us (the faster runs)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
