"""Multi-GPU validation on one node: NCCL parity of the parallel layouts, and 128K throughput of
the hybrid model vs the all-full model under context parallelism. Prints tables.

    python benchmarks/multi_gpu.py parity                    # every layout that fits the GPUs
    python benchmarks/multi_gpu.py throughput                # CP=8 and TP=2 x CP=4 at 128K
    python benchmarks/multi_gpu.py throughput --layouts cp8 --num-layers 16 --seq-length 131072
    python benchmarks/multi_gpu.py parity --device cpu --nproc 2   # gloo, the same code path

Each configuration is one `torchrun --standalone` job of this script (mode `worker`) running
the real trainer; every rank writes what it saw to a JSON file and this process compares.

Parity: the tiny hybrid model (both sparse patterns; BlockSparse with heterogeneous heads)
starts every layout from one saved initial checkpoint (loaded with `--finetune`, resharded by
dist_checkpointing) and trains a few steps on the same mock data with DP = 1, so every layout
computes the same global batches; losses and gradient norms must match the single-device run
(bf16 on GPU: relative 2e-2; fp32 on CPU: 1e-4).

Throughput: Llama-2-7B layer shapes (32 layers by default; `--num-layers` for the deepest that
fits), bf16, full recomputation, batch 1: step time and tokens/s/GPU of the hybrid (each
pattern) and the all-full model, and the bytes one CP rank sends per attention layer in the
forward (ring for full layers, the pattern-aware exchange for sparse layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

# name -> (tensor, pipeline, context) parallel sizes; DP is 1 in every layout.
PARITY_LAYOUTS = {
    "single": (1, 1, 1),
    "tp2": (2, 1, 1),
    "pp2": (1, 2, 1),
    "cp2": (1, 1, 2),
    "cp4": (1, 1, 4),
    "tp2_cp4": (2, 1, 4),
}
THROUGHPUT_LAYOUTS = {"cp8": (1, 1, 8), "tp2_cp4": (2, 1, 4)}

# The tiny hybrid model (6 layers, the middle two full) at 256 tokens: 8 CP chunks of 32.
PARITY_BASE = ["--model", "tiny", "--mock-data", "--seq-length", "256", "--micro-batch-size", "1",
               "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-3",
               "--lr-decay-style", "constant", "--lr-decay-iters", "100", "--clip-grad", "1.0",
               "--log-interval", "1000"]
PARITY_PATTERNS = {
    "attn_sink": ["--sink-tokens", "4", "--sliding-window-size", "64"],
    "block_sparse": ["--sparse-attention", "block_sparse", "--sparse-block-size", "16",
                     "--local-blocks", "2", "--vert-stride", "4", "--no-homo-head"],
}
PARITY_STEPS = 3


def say(*args):
    print(*args, flush=True)


def layout_flags(tp: int, pp: int, cp: int) -> List[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--context-parallel-size", str(cp)]


# ---- one torchrun job ----------------------------------------------------------------------

def worker(out_prefix: str, flags: List[str]) -> None:
    """Runs under torchrun: train with ``flags``; each rank writes its losses, gradient norms
    and step times (a pipeline's loss lives on its last stage only)."""
    import torch
    import torch.distributed as dist

    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.trainer import Trainer

    train = parse_args(flags)
    result = Trainer(train).fit()
    rank = dist.get_rank()
    record = {"losses": result.losses, "grad_norms": result.grad_norms,
              "step_times": result.step_times, "world": dist.get_world_size(),
              "checkpoint": result.checkpoint}
    if train.device == "cuda":
        record["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    with open(f"{out_prefix}.rank{rank}.json", "w") as f:
        json.dump(record, f)


def launch(nproc: int, flags: List[str], workdir: str, name: str, timeout: int) -> dict:
    """One torchrun job; returns rank records merged (loss from whichever rank holds it)."""
    prefix = os.path.join(workdir, name)
    log = prefix + ".log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "worker", "--out", prefix, "--", *flags]
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        oom = "out of memory" in tail or "OutOfMemoryError" in tail
        return {"failed": "out of memory" if oom else f"exit {proc.returncode}", "log": log,
                "tail": tail}
    records = []
    for rank in range(nproc):
        with open(f"{prefix}.rank{rank}.json") as f:
            records.append(json.load(f))
    merged = dict(records[0])
    merged["losses"] = {}
    for r in records:
        merged["losses"].update(r["losses"])
    merged["peak_mem_gb"] = max(r.get("peak_mem_gb", 0.0) for r in records)
    merged["wall_s"] = time.time() - t0
    return merged


# ---- parity ---------------------------------------------------------------------------------

def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def parity(args) -> bool:
    device_flags = ["--device", args.device] + (["--bf16"] if args.device == "cuda" else [])
    tol = 2e-2 if args.device == "cuda" else 1e-4
    workdir = tempfile.mkdtemp(prefix="longgen_parity_")
    rows, ok_all = [], True
    for pattern in args.patterns:
        pflags = PARITY_PATTERNS[pattern]
        base = PARITY_BASE + device_flags + pflags
        init = os.path.join(workdir, f"init_{pattern}")
        made = launch(1, base + ["--train-iters", "0", "--save", init], workdir,
                      f"init_{pattern}", args.timeout)
        if "failed" in made:
            raise RuntimeError(f"initial checkpoint for {pattern} failed ({made['failed']}):\n{made['tail']}")
        ref = None
        for name, (tp, pp, cp) in PARITY_LAYOUTS.items():
            nproc = tp * pp * cp
            if name not in args.layouts:
                continue
            if nproc > args.nproc:
                rows.append((pattern, name, nproc, None, None, f"skipped: needs {nproc} devices"))
                continue
            flags = base + layout_flags(tp, pp, cp) + [
                "--train-iters", str(PARITY_STEPS), "--load", init, "--finetune"]
            run = launch(nproc, flags, workdir, f"{pattern}_{name}", args.timeout)
            if "failed" in run:
                ok_all = False
                rows.append((pattern, name, nproc, None, None, f"FAILED ({run['failed']}, {run['log']})"))
                continue
            losses = [run["losses"][str(i)] for i in range(1, PARITY_STEPS + 1)]
            norms = [run["grad_norms"][str(i)] for i in range(1, PARITY_STEPS + 1)]
            if ref is None:
                ref = (losses, norms)
            loss_err = max(rel(a, b) for a, b in zip(losses, ref[0]))
            norm_err = max(rel(a, b) for a, b in zip(norms, ref[1]))
            ok = loss_err <= tol and norm_err <= tol
            ok_all &= ok
            rows.append((pattern, name, nproc, loss_err, norm_err, "ok" if ok else "MISMATCH"))
            say(f"parity {pattern:12} {name:8} ({nproc} ranks): losses "
                + " ".join(f"{x:.4f}" for x in losses) + "  grad norms "
                + " ".join(f"{x:.4f}" for x in norms) + f"  ({run['wall_s']:.0f} s)")
    say(f"\nParity vs the first layout run (single device), {args.device}, tolerance {tol:g} "
        f"(relative), {PARITY_STEPS} steps:\n")
    say("| pattern | layout | ranks | max loss rel. err | max grad-norm rel. err | result |")
    say("|---|---|---:|---:|---:|---|")
    for pattern, name, nproc, le, ne, verdict in rows:
        fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
        say(f"| {pattern} | {name} | {nproc} | {fmt(le)} | {fmt(ne)} | {verdict} |")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return ok_all


# ---- throughput -----------------------------------------------------------------------------

def cp_bytes_per_layer(variant: str, seq_len: int, cp: int, tp: int) -> Dict[str, int]:
    """Forward bytes the busiest CP rank sends per attention layer, by layer kind."""
    from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern
    from megatron_longgen.models.presets import get_preset
    from megatron_longgen.parallel.cp.plan import exchange_bytes_sent, ring_bytes_sent

    shape = get_preset("llama2-7b")
    kv, d = shape.num_query_groups // tp, shape.hidden_size // shape.num_attention_heads
    out = {"full": ring_bytes_sent(seq_len, cp, 1, kv, d, 2)}
    if variant == "hybrid attn_sink":
        out["sparse"] = max(exchange_bytes_sent(AttnSinkPattern(64, 4096), seq_len, cp, 1, kv, d, 2))
    elif variant == "hybrid block_sparse":
        pattern = BlockSparsePattern(64, 16, 8, False, shape.num_attention_heads, shape.num_query_groups)
        out["sparse"] = max(exchange_bytes_sent(pattern, seq_len, cp, 1, kv, d, 2))
    return out


def throughput(args) -> bool:
    from train_step import VARIANTS, step_flags

    workdir = tempfile.mkdtemp(prefix="longgen_throughput_")
    rows = []
    for name in args.layouts:
        tp, pp, cp = THROUGHPUT_LAYOUTS[name]
        nproc = tp * pp * cp
        if nproc > args.nproc:
            say(f"throughput {name}: skipped, needs {nproc} GPUs (have {args.nproc})")
            continue
        base = None
        for variant in VARIANTS:
            flags = step_flags(args.seq_length, variant, args.num_layers, args.vocab_size,
                               args.warmup + args.iters) + layout_flags(tp, pp, cp)
            run = launch(nproc, flags, workdir, f"{name}_{variant.replace(' ', '_')}", args.timeout)
            comm = cp_bytes_per_layer(variant, args.seq_length, cp, tp)
            if "failed" in run:
                say(f"throughput {name} {variant}: {run['failed']} (log {run['log']})")
                rows.append((name, variant, None, None, None, None, comm))
                continue
            step = statistics.median(run["step_times"][args.warmup:])
            base = step if variant == "full" else base
            tokens_per_gpu = args.seq_length / step / nproc
            rows.append((name, variant, step, tokens_per_gpu, base / step if base else None,
                         run["peak_mem_gb"], comm))
            say(f"throughput {name} {variant}: {step:.3f} s/step, {tokens_per_gpu:,.0f} tokens/s/GPU "
                f"({run['wall_s']:.0f} s)")
    say(f"\n{args.num_layers} Llama-2-7B-shaped layers, {args.seq_length} tokens, batch 1, bf16, "
        f"full recomputation, vocab {args.vocab_size}:\n")
    say("| layout | model | step time (s) | tokens/s/GPU | speedup vs full | peak mem (GB) | "
        "CP bytes sent per full layer | per sparse layer |")
    say("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, variant, step, tps, speedup, mem, comm in rows:
        fmt = lambda v, f: "failed" if v is None else format(v, f)  # noqa: E731
        sparse = f"{comm['sparse'] / 2**20:.0f} MiB" if "sparse" in comm else "-"
        say(f"| {name} | {variant} | {fmt(step, '.3f')} | {fmt(tps, ',.0f')} | {fmt(speedup, '.2f')} | "
            f"{fmt(mem, '.1f')} | {comm['full'] / 2**20:.0f} MiB | {sparse} |")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return all(r[2] is not None for r in rows)


def device_count(device: str) -> int:
    if device == "cpu":
        return 2
    import torch

    return torch.cuda.device_count()


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        p = argparse.ArgumentParser()
        p.add_argument("--out", required=True)
        split = argv.index("--")
        worker(p.parse_args(argv[1:split]).out, argv[split + 1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("mode", choices=["parity", "throughput"])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--nproc", type=int, default=None,
                        help="devices to use (default: all GPUs; 2 ranks on cpu)")
    parser.add_argument("--layouts", nargs="+", default=None,
                        help=f"parity: {list(PARITY_LAYOUTS)}; throughput: {list(THROUGHPUT_LAYOUTS)}")
    parser.add_argument("--patterns", nargs="+", choices=list(PARITY_PATTERNS),
                        default=list(PARITY_PATTERNS), help="parity: sparse patterns to check")
    parser.add_argument("--seq-length", type=int, default=131072)
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per torchrun job")
    parser.add_argument("--keep", action="store_true", help="keep the logs and checkpoints")
    args = parser.parse_args(argv)
    known = PARITY_LAYOUTS if args.mode == "parity" else THROUGHPUT_LAYOUTS
    args.layouts = args.layouts or list(known)
    unknown = [x for x in args.layouts if x not in known]
    if unknown:
        parser.error(f"unknown {args.mode} layouts {unknown}; choose from {list(known)}")
    if args.mode == "throughput" and args.device != "cuda":
        parser.error("throughput runs on GPUs only")
    args.nproc = args.nproc or device_count(args.device)
    if args.nproc < 1:
        parser.error("no GPU found: pass --device cpu for the gloo parity check")
    ok = parity(args) if args.mode == "parity" else throughput(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
