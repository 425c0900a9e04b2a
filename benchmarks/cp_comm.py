"""Context-parallel communication per attention layer: ring vs pattern-aware exchange vs
TE-style all-gather. CPU arithmetic from the static plans; prints a Markdown table.

    python benchmarks/cp_comm.py [--seq-length 131072] [--cp 2 4 8 16 32] [--tp 1]

Forward bytes one CP rank sends per layer (batch 1, bf16, K and V), for Llama-2 7B (32 KV
heads) and 70B (8 KV heads), head dim 128. Sparse columns are the busiest rank's count.
AttnSink: sink 64, window 4096. BlockSparse: block 64, 16 local blocks, vertical stride 8,
heterogeneous heads (each KV head gets exactly its own vertical blocks). The backward sends
about the same again (the exchange returns dK/dV of the rows it received; the ring sends K/V
again plus fp32 dK/dV).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern  # noqa: E402
from megatron_longgen.parallel.cp.plan import exchange_bytes_sent, ring_bytes_sent  # noqa: E402

MODELS = {"Llama-2 7B": (32, 32), "Llama-2 70B": (64, 8)}  # query heads, KV heads
HEAD_DIM, BF16 = 128, 2


def table(seq_len: int, cps, tp: int = 1):
    rows = []
    for model, (heads, kv_heads) in MODELS.items():
        kv = kv_heads // tp  # one TP rank's KV heads; patterns use the first TP rank's
        patterns = {"attn_sink": AttnSinkPattern(64, 4096),
                    "block_sparse": BlockSparsePattern(64, 16, 8, False, heads, kv_heads)}
        for cp in cps:
            ring = ring_bytes_sent(seq_len, cp, 1, kv, HEAD_DIM, BF16)
            sparse = {name: max(exchange_bytes_sent(p, seq_len, cp, 1, kv, HEAD_DIM, BF16))
                      for name, p in patterns.items()}
            rows.append((model, cp, ring, ring, sparse["attn_sink"], sparse["block_sparse"]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=131072)
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)
    mib = 2 ** 20
    print(f"Forward MiB sent per CP rank per layer, L = {args.seq_length}, TP = {args.tp}, bf16")
    print("| model | CP | ring | TE all-gather | AttnSink exchange | BlockSparse exchange |")
    print("|---|---|---|---|---|---|")
    for model, cp, ring, gather, sink, block in table(args.seq_length, args.cp, args.tp):
        print(f"| {model} | {cp} | {ring / mib:.0f} | {gather / mib:.0f} | {sink / mib:.0f} "
              f"({sink / ring:.1%}) | {block / mib:.0f} ({block / ring:.1%}) |")


if __name__ == "__main__":
    main()
