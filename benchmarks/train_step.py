"""Training step of the LongGen hybrids vs the same model with every layer full, on one GPU:
step time, tokens/s, model-FLOPs utilisation and peak memory.

Llama-2-7B layer shapes (hidden 4096, 32 heads, FFN 11008) at reduced depth (default 6
layers; the hybrids' middle third full), bf16, batch 1, mock data, through the real trainer
(Megatron-Core schedules, DDP, Adam). Each configuration runs in a fresh process (honest
peaks, no compiled kernels carried over). Rows per sequence length:

- ``full``, ``hybrid attn_sink``, ``hybrid block_sparse`` on their best settings:
  ``--core-attention-backend auto`` (flash-attn-4 where it is installed), the fused layer ops
  (on by default on CUDA) and the chunked linear cross-entropy, vocabulary ``--vocab-size``
  (32000, Llama-2's);
- ``baseline hybrid attn_sink``: the same hybrid as the project trained it before those:
  ``auto`` without flash-attn-4, unfused layer ops, Megatron's loss on the whole sequence's
  logits. Where that runs out of memory it is run again with vocabulary 8192, and the row's
  name says so.

MFU counts model FLOPs (``training/flops.py``: 3x the forward, attention on the pairs each
pattern allows, recomputation not counted) over the GPU's dense bf16 peak (989 TFLOP/s on an
H100 / H200; ``--peak-tflops``). Peak memory is ``torch.cuda.max_memory_allocated`` in GiB.

``--recompute-sweep`` measures what activation recomputation costs at 128K instead: full
(every layer), selective (core attention), partial (``--recompute-method block
--recompute-num-layers N``: the first N layers) and none, for the AttnSink hybrid and the
full model; consecutive settings give the time and memory of one recomputed layer.

    python benchmarks/train_step.py --json benchmarks/results/train_step_h200.json
    python benchmarks/train_step.py --seq-lengths 131072 --models full "hybrid attn_sink"
    python benchmarks/train_step.py --recompute-sweep --json recompute_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

# ---- what a row can change: trainer flags (pretrain_longgen.py's), one place each ---------

MODELS = {
    "full": ["--full-attention-placement", "all"],
    "hybrid attn_sink": ["--sparse-attention", "attn_sink", "--sink-tokens", "64",
                         "--sliding-window-size", "4096"],
    "hybrid block_sparse": ["--sparse-attention", "block_sparse", "--sparse-block-size", "64",
                            "--local-blocks", "16", "--vert-stride", "8", "--no-homo-head"],
}
RECOMPUTE = {
    "full": ["--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"],
    "selective": ["--recompute-granularity", "selective"],  # Megatron's: core attention
    "none": [],
}
LINEAR_CROSS_ENTROPY = ["--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "linear"]
# The fused layer ops are on by default on CUDA; these turn each one off (Megatron's names).
UNFUSED_LAYER_OPS = ["--no-rms-norm-fusion", "--no-rope-fusion", "--no-bias-swiglu-fusion",
                     "--no-bias-dropout-fusion"]
# flash-attn-4's import name: a baseline process hides it, so ``auto`` picks as without it.
FA4_MODULE = "flash_attn"

BASELINE_PREFIX = "baseline "
FALLBACK_VOCAB = 8192  # the vocabulary Megatron's loss fitted with at 128K on an 80 GB GPU
SWEEP_RECOMPUTE = ["full", "partial:4", "partial:2", "selective", "none"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One timed configuration (one process)."""
    seq_length: int
    model: str  # a key of MODELS
    vocab_size: int
    recompute: str = "full"  # a key of RECOMPUTE, or "partial:N"
    fused_layer_ops: bool = True
    linear_cross_entropy: bool = True
    without_fa4: bool = False
    name: Optional[str] = None  # the row's name; the model's by default

    @property
    def row_name(self) -> str:
        return self.name or self.model


def recompute_flags(setting: str) -> List[str]:
    if setting.startswith("partial:"):
        return ["--recompute-granularity", "full", "--recompute-method", "block",
                "--recompute-num-layers", setting.split(":", 1)[1]]
    return list(RECOMPUTE[setting])


def recomputed_layers(setting: str, num_layers: int) -> Optional[int]:
    """Layers whose forward runs again in backward (None: selective, a part of every layer)."""
    if setting.startswith("partial:"):
        return min(int(setting.split(":", 1)[1]), num_layers)
    return {"full": num_layers, "none": 0}.get(setting)


def model_flags(model: str, num_layers: int) -> List[str]:
    if model == "full":
        return list(MODELS[model])
    third = num_layers // 3  # the middle third full; an explicit list overrides placement "all"
    return ["--full-attention-layers", *map(str, range(third, 2 * third)), *MODELS[model]]


def trainer_flags(case: Case, num_layers: int, iters: int) -> List[str]:
    """The trainer's flags for ``case``: batch 1, mock data, no logging in the timed steps."""
    return [
        "--model", "llama2-7b", "--num-layers", str(num_layers), "--device", "cuda",
        "--vocab-size", str(case.vocab_size), "--bf16", "--mock-data", "--seq-length", str(case.seq_length),
        "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", str(iters), "--log-interval", "1000000",
        "--lr", "1e-5", "--min-lr", "1e-6", "--core-attention-backend", "auto",
        *recompute_flags(case.recompute),
        *model_flags(case.model, num_layers),
        *(LINEAR_CROSS_ENTROPY if case.linear_cross_entropy else []),
        *([] if case.fused_layer_ops else UNFUSED_LAYER_OPS),
    ]


# ---- one configuration, in its own process ----------------------------------------------

def hide_module(name: str) -> None:
    """Make ``import name`` fail in this process, as if the package were not installed."""
    sys.modules[name] = None  # importlib raises ModuleNotFoundError for a None entry


def attention_backends(trainer) -> Dict[str, str]:
    """The backend each of the model's attention patterns ran on."""
    from megatron_longgen.attention.backends import resolve_backend

    config = trainer.config
    patterns = {config.layer_pattern(n) for n in range(1, config.num_layers + 1)}
    return {p.name: resolve_backend(config.core_attention_backend, p, trainer.device).name
            for p in sorted(patterns, key=lambda p: p.name)}


def run_one(flags: List[str], warmup: int) -> dict:
    """Train ``flags`` in this process; the timed steps after ``warmup``."""
    from megatron_longgen.training.arguments import parse_args
    from megatron_longgen.training.logger import memory_gb
    from megatron_longgen.training.trainer import Trainer

    trainer = Trainer(parse_args(flags))
    result = trainer.fit()
    times = result.step_times[warmup:]
    cuda = trainer.device.type == "cuda"
    return {
        "step_times_s": times,
        "peak_mem_gb": memory_gb(trainer.device),
        "reserved_mem_gb": torch.cuda.max_memory_reserved(trainer.device) / 2**30 if cuda else None,
        "flops_per_sequence": trainer.flops_per_sequence,
        "attention": attention_backends(trainer),
        "full_layers": list(trainer.config.full_layer_indices),
        "loss": result.losses.get(result.iteration),
        "grad_norm": result.grad_norms.get(result.iteration),
    }


def run_in_subprocess(flags: List[str], warmup: int, without_fa4: bool) -> dict:
    cmd = [sys.executable, __file__, "--warmup", str(warmup),
           *(["--without-fa4"] if without_fa4 else []), "--one", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    if "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr:
        return {"oom": True}
    raise RuntimeError(f"{' '.join(flags)} failed:\n{proc.stderr[-4000:]}")


# ---- rows ---------------------------------------------------------------------------------

def measure(case: Case, args) -> dict:
    flags = trainer_flags(case, args.num_layers, args.warmup + args.iters)
    r = run_in_subprocess(flags, args.warmup, case.without_fa4)
    row = {
        "seq_length": case.seq_length, "model": case.row_name, "vocab_size": case.vocab_size,
        "recompute": case.recompute,
        "recomputed_layers": recomputed_layers(case.recompute, args.num_layers),
        "backends": {
            "attention": r.get("attention"),
            "layer_ops": "fused" if case.fused_layer_ops else "unfused",
            "loss": "linear cross-entropy" if case.linear_cross_entropy else "Megatron (whole logits)",
            **({"flash_attn_4": "hidden"} if case.without_fa4 else {}),
        },
        "step_time_s": None, "tokens_per_s": None, "mfu": None, "peak_mem_gb": None,
        "num_layers": args.num_layers, "flags": flags,
    }
    if r.get("oom"):
        return {**row, "oom": True}
    step = statistics.median(r["step_times_s"])
    tflops = r["flops_per_sequence"] / step / 1e12
    row.update(
        step_time_s=step, tokens_per_s=case.seq_length / step,
        mfu=tflops / args.peak_tflops if args.peak_tflops else None, tflops_per_gpu=tflops,
        peak_mem_gb=r["peak_mem_gb"], reserved_mem_gb=r["reserved_mem_gb"],
        step_times_s=r["step_times_s"], full_layers=r["full_layers"],
        loss=r["loss"], grad_norm=r["grad_norm"])
    return row


def step_cases(args) -> List[Case]:
    cases = []
    for seq in args.seq_lengths:
        for model in args.models:
            cases.append(Case(seq, model, args.vocab_size, args.recompute))
        for model in args.baseline_models:
            cases.append(Case(seq, model, args.vocab_size, args.recompute, fused_layer_ops=False,
                              linear_cross_entropy=False, without_fa4=True,
                              name=BASELINE_PREFIX + model))
    return cases


def sweep_cases(args) -> List[Case]:
    return [Case(seq, model, args.vocab_size, setting)
            for seq in args.seq_lengths for model in args.models for setting in args.recompute_settings]


def add_speedups(rows: List[dict]) -> None:
    """Each row's step-time ratio to the ``full`` row of its length and recompute setting."""
    full = {(r["seq_length"], r["recompute"]): r["step_time_s"] for r in rows
            if r["model"] == "full" and r["step_time_s"]}
    for r in rows:
        base = full.get((r["seq_length"], r["recompute"]))
        r["speedup_vs_full"] = base / r["step_time_s"] if base and r["step_time_s"] else None


def run_rows(cases: List[Case], args) -> List[dict]:
    rows = []
    start = time.time()
    for i, case in enumerate(cases, 1):
        t0 = time.time()
        row = measure(case, args)
        if row.get("oom") and case.name and case.vocab_size != FALLBACK_VOCAB:
            print(f"  {case.row_name} at {case.seq_length}, vocab {case.vocab_size}: out of memory; "
                  f"again with vocab {FALLBACK_VOCAB}", flush=True)
            row = measure(dataclasses.replace(
                case, vocab_size=FALLBACK_VOCAB,
                name=f"{case.row_name} (vocab {FALLBACK_VOCAB})"), args)
        rows.append(row)
        add_speedups(rows)
        what = "out of memory" if row.get("oom") else (
            f"{row['step_time_s']:.3f} s/step, {row['peak_mem_gb']:.1f} GiB, "
            f"attention {row['backends']['attention']}")
        print(f"[{i}/{len(cases)}] {case.seq_length} {row['model']} (recompute {case.recompute}): "
              f"{what} ({time.time() - t0:.0f} s; {time.time() - start:.0f} s in all)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    return rows


# ---- tables -------------------------------------------------------------------------------

def _measured(r: dict) -> str:
    """Step time, tokens/s, ratio to full, MFU and peak memory as table cells."""
    if r.get("oom"):
        return "OOM | | | | |"
    speedup = "-" if r["speedup_vs_full"] is None else f"{r['speedup_vs_full']:.2f}"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    return (f"{r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | {speedup} | {mfu} | "
            f"{r['peak_mem_gb']:.1f} |")


def print_step_table(rows: List[dict]) -> None:
    print("\n| seq len | model | vocab | loss | attention | step time (s) | tokens/s | "
          "vs full | MFU | peak mem (GiB) |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        attention = ", ".join(f"{k} {v}" for k, v in (r["backends"]["attention"] or {}).items())
        loss = "linear" if r["backends"]["loss"].startswith("linear") else "Megatron"
        print(f"| {r['seq_length'] // 1024}K | {r['model']} | {r['vocab_size']} | {loss} | "
              f"{attention or '-'} | {_measured(r)}")


def per_layer_costs(rows: List[dict]) -> List[dict]:
    """Time and memory of recomputing one layer, between consecutive settings of the same
    model and length that recompute whole layers (full, partial:N, none)."""
    out = []
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["recomputed_layers"] is not None and not r.get("oom"):
            groups.setdefault((r["seq_length"], r["model"]), []).append(r)
    for (seq, model), group in groups.items():
        group.sort(key=lambda r: -r["recomputed_layers"])
        for more, fewer in zip(group, group[1:]):
            n = more["recomputed_layers"] - fewer["recomputed_layers"]
            if n <= 0:
                continue
            out.append({
                "seq_length": seq, "model": model,
                "layers": list(range(fewer["recomputed_layers"], more["recomputed_layers"])),
                "time_s_per_layer": (more["step_time_s"] - fewer["step_time_s"]) / n,
                "mem_gb_per_layer": (fewer["peak_mem_gb"] - more["peak_mem_gb"]) / n,
            })
    return out


def print_sweep_table(rows: List[dict]) -> None:
    print("\n| seq len | model | recompute | layers recomputed | step time (s) | tokens/s | "
          "vs full | MFU | peak mem (GiB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        n = "-" if r["recomputed_layers"] is None else r["recomputed_layers"]
        print(f"| {r['seq_length'] // 1024}K | {r['model']} | {r['recompute']} | {n} | "
              f"{_measured(r)}")
    print("\nRecomputing one layer (0-based layers; the hybrid's full layers are the middle third):")
    print("| seq len | model | layers | step time per recomputed layer (s) | "
          "memory saved per recomputed layer (GiB) |")
    print("|---|---|---|---:|---:|")
    for c in per_layer_costs(rows):
        print(f"| {c['seq_length'] // 1024}K | {c['model']} | {c['layers']} | "
              f"{c['time_s_per_layer']:.3f} | {c['mem_gb_per_layer']:.2f} |")


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=None,
                        help="sequence lengths (default 32K 64K 128K; 128K with --recompute-sweep)")
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                        help="models on their best settings (default: all; the sweep: "
                             "hybrid attn_sink and full)")
    parser.add_argument("--baseline-models", nargs="*", default=["hybrid attn_sink"],
                        choices=list(MODELS),
                        help="models also run as the baseline (the flag alone: none)")
    parser.add_argument("--num-layers", type=int, default=6, help="Llama-2-7B-shaped layers")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--recompute", default="full",
                        help="recompute setting of the step rows: full, selective, none or partial:N")
    parser.add_argument("--recompute-sweep", action="store_true",
                        help="rows for each --recompute-settings instead of the step rows")
    parser.add_argument("--recompute-settings", nargs="+", default=SWEEP_RECOMPUTE,
                        help="settings of the sweep: full, selective, none, partial:N")
    parser.add_argument("--iters", type=int, default=2, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compiles)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU for MFU (default: the GPU's known peak)")
    parser.add_argument("--json", default=None, help="write the rows here (after every row)")
    parser.add_argument("--without-fa4", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child: one configuration
        if args.without_fa4:
            hide_module(FA4_MODULE)  # before the attention backends are registered
        print("RESULT " + json.dumps(run_one(args.one, args.warmup)), flush=True)
        return []
    for setting in [args.recompute, *args.recompute_settings]:
        if setting not in RECOMPUTE and not (setting.startswith("partial:")
                                             and setting.split(":", 1)[1].isdigit()):
            parser.error(f"recompute setting {setting!r}: use full, selective, none or partial:N")
    if args.recompute_sweep:
        args.seq_lengths = args.seq_lengths or [131072]
        args.models = args.models or ["hybrid attn_sink", "full"]
    else:
        args.seq_lengths = args.seq_lengths or [32768, 65536, 131072]
        args.models = args.models or list(MODELS)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    from megatron_longgen.training.logger import peak_tflops

    args.peak_tflops = peak_tflops(torch.device("cuda"), args.peak_tflops)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.num_layers} "
          f"Llama-2-7B-shaped layers ({args.num_layers // 3} full in the hybrids), vocab "
          f"{args.vocab_size}, peak {args.peak_tflops} TFLOP/s", flush=True)
    if args.recompute_sweep:
        rows = run_rows(sweep_cases(args), args)
        print_sweep_table(rows)
    else:
        rows = run_rows(step_cases(args), args)
        print_step_table(rows)
    return rows


if __name__ == "__main__":
    main()
