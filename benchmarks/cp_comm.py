"""Context-parallel communication per attention layer: ring vs pattern-aware exchange vs
TE-style all-gather. CPU arithmetic from the static plans; prints a Markdown table.

    python benchmarks/cp_comm.py [--seq-length 131072] [--cp 2 4 8 16 32] [--tp 1]
    python benchmarks/cp_comm.py --plan-time [--json benchmarks/results/cp_plan_cpu.json]

Forward bytes one CP rank sends per layer (batch 1, bf16, K and V), for Llama-2 7B (32 KV
heads) and 70B (8 KV heads), head dim 128. Sparse columns are the busiest rank's count.
AttnSink: sink 64, window 4096. BlockSparse: block 64, 16 local blocks, vertical stride 8,
heterogeneous heads (each KV head gets exactly its own vertical blocks). The backward sends
about the same again (the exchange returns dK/dV of the rows it received; the ring sends K/V
again plus fp32 dK/dV).

``--plan-time`` instead times building one rank's exchange plan (Llama-2 7B, TP 1: 32 KV
heads) at 128K / CP 8, 256K / CP 16, 512K / CP 32 and 1M / CP 64, for ranks 0, CP/2 and CP-1
(rank 0 holds the first and the last chunk: the most rows to send and to receive).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern  # noqa: E402
from megatron_longgen.parallel.cp.plan import exchange_bytes_sent, exchange_plan, ring_bytes_sent  # noqa: E402

MODELS = {"Llama-2 7B": (32, 32), "Llama-2 70B": (64, 8)}  # query heads, KV heads
HEAD_DIM, BF16 = 128, 2
PLAN_LAYOUTS = ((131072, 8), (262144, 16), (524288, 32), (1048576, 64))  # (L, CP)


def patterns(heads: int, kv_heads: int):
    return {"attn_sink": AttnSinkPattern(64, 4096),
            "block_sparse": BlockSparsePattern(64, 16, 8, False, heads, kv_heads)}


def table(seq_len: int, cps, tp: int = 1):
    rows = []
    for model, (heads, kv_heads) in MODELS.items():
        kv = kv_heads // tp  # one TP rank's KV heads; patterns use the first TP rank's
        for cp in cps:
            ring = ring_bytes_sent(seq_len, cp, 1, kv, HEAD_DIM, BF16)
            sparse = {name: max(exchange_bytes_sent(p, seq_len, cp, 1, kv, HEAD_DIM, BF16))
                      for name, p in patterns(heads, kv_heads).items()}
            rows.append((model, cp, ring, ring, sparse["attn_sink"], sparse["block_sparse"]))
    return rows


def plan_times(layouts=PLAN_LAYOUTS, repeats: int = 2):
    """Seconds to build one rank's plan (uncached, best of ``repeats``: other processes on the
    cores only add time), per layout, pattern and timed rank."""
    heads, kv_heads = MODELS["Llama-2 7B"]
    records = []
    for seq_len, cp in layouts:
        for name, pattern in patterns(heads, kv_heads).items():
            for rank in sorted({0, cp // 2, cp - 1}):
                seconds, cpu_seconds = [], []
                for _ in range(repeats):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    plan = exchange_plan.__wrapped__(pattern, seq_len, cp, rank, tuple(range(kv_heads)))
                    seconds.append(time.perf_counter() - start)
                    cpu_seconds.append(time.process_time() - cpu_start)
                records.append({"seq_len": seq_len, "cp": cp, "pattern": name, "rank": rank,
                                "seconds": round(min(seconds), 3), "cpu_seconds": round(min(cpu_seconds), 3),
                                "rows_sent": sum(plan.send_splits), "rows_received": sum(plan.recv_splits)})
    return records


def print_plan_times(records, json_path=None):
    print("Exchange-plan build time for one rank (CPU, Llama-2 7B, TP 1: 32 KV heads)")
    print("| L | CP | pattern | slowest rank | seconds | CPU seconds | rows sent | rows received |")
    print("|---|---|---|---|---|---|---|---|")
    for seq_len, cp in dict.fromkeys((r["seq_len"], r["cp"]) for r in records):
        for name in dict.fromkeys(r["pattern"] for r in records):
            r = max((r for r in records if (r["seq_len"], r["cp"], r["pattern"]) == (seq_len, cp, name)),
                    key=lambda r: r["seconds"])
            print(f"| {seq_len // 1024}K | {cp} | {name} | {r['rank']} | {r['seconds']:.2f} | "
                  f"{r['cpu_seconds']:.2f} | {r['rows_sent']} | {r['rows_received']} |")
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "cpu_cores": os.cpu_count(),
                       "torch": torch.__version__, "model": "Llama-2 7B, TP 1 (32 KV heads)",
                       "ranks_timed": "0, CP/2, CP-1", "records": records}, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=131072, help="sequence length L of the byte table")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                        help="context-parallel sizes of the byte table")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (splits the KV heads)")
    parser.add_argument("--plan-time", action="store_true",
                        help="time building one rank's exchange plan at 128K/CP 8 .. 1M/CP 64 instead")
    parser.add_argument("--json", default=None, help="with --plan-time: also write the timings to this JSON file")
    args = parser.parse_args(argv)
    if args.plan_time:
        print_plan_times(plan_times(), args.json)
        return
    mib = 2 ** 20
    print(f"Forward MiB sent per CP rank per layer, L = {args.seq_length}, TP = {args.tp}, bf16")
    print("| model | CP | ring | TE all-gather | AttnSink exchange | BlockSparse exchange |")
    print("|---|---|---|---|---|---|")
    for model, cp, ring, gather, sink, block in table(args.seq_length, args.cp, args.tp):
        print(f"| {model} | {cp} | {ring / mib:.0f} | {gather / mib:.0f} | {sink / mib:.0f} "
              f"({sink / ring:.1%}) | {block / mib:.0f} ({block / ring:.1%}) |")


if __name__ == "__main__":
    main()
