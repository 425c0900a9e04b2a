"""Where a training step's time goes: CUDA kernel time by kind, from torch.profiler.

    python benchmarks/profile_train_step.py                          # AttnSink hybrid, 128K
    python benchmarks/profile_train_step.py --variant full --seq-length 65536

Same configuration as a row of ``benchmarks/train_step.py`` (Llama-2-7B-shaped layers, bf16,
full recompute, mock data, the chunked loss, the real trainer). Two steps warm the kernels; the third is profiled.
Prints the kernel time of each kind (matrix products, attention, norms, RoPE, elementwise,
optimizer, ...) and the slowest kernels next to the step's wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.profile_inference import kernel_table  # noqa: E402
from benchmarks.train_step import MODELS, Case, trainer_flags  # noqa: E402
from megatron_longgen.training.arguments import parse_args  # noqa: E402
from megatron_longgen.training.trainer import Trainer  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-length", type=int, default=131072, help="tokens per sequence")
    p.add_argument("--variant", default="hybrid attn_sink", choices=list(MODELS), help="model to profile")
    p.add_argument("--num-layers", type=int, default=6, help="Llama-2-7B-shaped layers (1/3 full in a hybrid)")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary (loss: chunked linear cross-entropy)")
    p.add_argument("--unfused", action="store_true", help="the layer ops unfused (Megatron's torch ops)")
    p.add_argument("--top", type=int, default=25, help="rows of the slowest-kernel and op tables")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further trainer flags, appended as given (e.g. --extra --no-rope-fusion)")
    args = p.parse_args(argv)
    case = Case(args.seq_length, args.variant, args.vocab_size, fused_layer_ops=not args.unfused)
    flags = trainer_flags(case, args.num_layers, iters=3) + list(args.extra)
    trainer = Trainer(parse_args(flags))
    it = trainer._iterators(trainer.train_ds, 0)
    for chunk in trainer.model:
        chunk.train()
    for _ in range(2):
        trainer.train_step(it)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        trainer.train_step(it)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    print(f"\n## {args.variant}, {args.seq_length} tokens, {args.num_layers} layers, "
          f"vocab {args.vocab_size}: one training step")
    kernel_table(prof, wall, args.top)
    print("\n| torch op (kernels it launched) | calls | ms |\n|---|---:|---:|")
    ops = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU
           and e.key.startswith("aten::") and e.device_time_total > 0]
    for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"| {e.key} | {e.count} | {e.self_device_time_total / 1e3:.2f} |")


if __name__ == "__main__":
    main()
