"""The loss of one long sequence: Megatron's output layer + cross-entropy vs the fused ones.

One GPU (TP=1), bf16, hidden 4096 (Llama-2-7B), the loss's forward and backward for the
hidden states and the output weight, per-token loss weighted as the trainer's loss mask does.
For each vocabulary and implementation: median time, peak memory above the inputs, and the
largest difference of the loss and gradients from Megatron's own path (where it fits).

- ``megatron``: ``output_layer`` matmul, then ``tensor_parallel.vocab_parallel_cross_entropy``
  (GPTModel's default loss: the whole sequence's logits in bf16 and fp32).
- ``megatron-native``: the same logits, then ``fused_vocab_parallel_cross_entropy``
  (``--cross-entropy-loss-fusion --cross-entropy-fusion-impl native``).
- ``linear``: ``linear_cross_entropy`` (``--cross-entropy-fusion-impl linear``), chunks of
  ``--chunk-mb``.
- ``liger``: Liger's ``LigerFusedLinearCrossEntropyFunction`` (Triton, CUDA only) when
  ``liger-kernel`` is installed, per-token (``reduction="none"``, which recomputes the logits
  in backward as ``linear`` does) with fp32 weight-gradient accumulation. It has no
  vocabulary-parallel TP, so it could not replace Megatron's loss under TP.

    python benchmarks/cross_entropy.py                      # 128K tokens, vocab 32000 and 128256
    python benchmarks/cross_entropy.py --device cpu --tokens 256 --hidden 64 --vocab 512  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_longgen.models.linear_cross_entropy import linear_cross_entropy

IMPLS = ("megatron", "megatron-native", "linear", "liger")


def init_single_process(device: str) -> None:
    """Megatron's TP group of one rank: vocab_parallel_cross_entropy reads it."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def loss_fn(impl: str, chunk_mb: float) -> Optional[Callable]:
    """(hidden [s, 1, h], weight [v, h], labels [1, s]) -> per-token loss [1, s] (or a sum)."""
    from megatron.core import parallel_state, tensor_parallel

    def whole_logits(cross_entropy):
        def run(hidden, weight, labels):
            logits = torch.matmul(hidden, weight.t())
            return cross_entropy(logits, labels.t().contiguous()).t()
        return run

    if impl == "megatron":
        return whole_logits(tensor_parallel.vocab_parallel_cross_entropy)
    if impl == "megatron-native":
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

        group = parallel_state.get_tensor_model_parallel_group()
        return whole_logits(lambda logits, target: fused_vocab_parallel_cross_entropy(logits, target, group))
    if impl == "linear":
        group = parallel_state.get_tensor_model_parallel_group()
        return lambda hidden, weight, labels: linear_cross_entropy(
            hidden, weight, labels, tp_group=group, sequence_parallel=False, chunk_mb=chunk_mb)
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None
    # Positional: bias, ce_weight, ignore_index, lse_square_scale, label_smoothing, reduction,
    # softcap, return_z_loss, accum_dtype.
    return lambda hidden, weight, labels: LigerFusedLinearCrossEntropyFunction.apply(
        hidden.flatten(0, 1), weight, labels.flatten(), None, None, -100, 0.0, 0.0, "none",
        None, False, torch.float32)[0].view_as(labels)


def inputs(tokens: int, hidden: int, vocab: int, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(tokens, 1, hidden, device=device, dtype=dtype, generator=g)
    w = (torch.randn(vocab, hidden, device=device, dtype=dtype, generator=g) / hidden ** 0.5)
    labels = torch.randint(0, vocab, (1, tokens), device=device, generator=g)
    mask = (torch.rand(1, tokens, device=device, generator=g) > 0.1).float()
    return h, w, labels, mask


def step(fn, h, w, labels, mask):
    """Forward and backward as the trainer runs them: sum of the masked per-token loss."""
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(h, w, labels)
    (loss.float() * mask).sum().backward()
    return loss.detach(), h.grad, w.grad


def measure(fn, args, h, w, labels, mask) -> Dict[str, object]:
    cuda = h.is_cuda
    for _ in range(args.warmup):
        step(fn, h, w, labels, mask)
    times: List[float] = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    for _ in range(args.iters):
        t0 = time.perf_counter()
        out = step(fn, h, w, labels, mask)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if cuda else float("nan")
    return {"ms": 1e3 * statistics.median(times), "peak_gib": peak}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072, help="tokens of the sequence")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="vocabulary sizes")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations")
    parser.add_argument("--chunk-mb", type=float, default=512.0, help="linear: MiB of fp32 logits per chunk")
    parser.add_argument("--iters", type=int, default=5, help="timed forward+backward runs (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    init_single_process(args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {args.tokens} tokens, hidden {args.hidden}, "
          f"{dtype}, linear chunks of {args.chunk_mb:g} MiB")
    rows = []
    for vocab in args.vocab:
        h, w, labels, mask = inputs(args.tokens, args.hidden, vocab, args.device, dtype)
        reference = None
        for impl in args.impls:
            fn = loss_fn(impl, args.chunk_mb)
            if fn is None:
                print(f"vocab {vocab} {impl}: not installed", flush=True)
                continue
            row = {"vocab": vocab, "impl": impl}
            try:
                row.update(measure(fn, args, h, w, labels, mask))
                got = step(fn, h, w, labels, mask)
                if impl == "megatron":
                    reference = got
                elif reference is not None:
                    row.update(loss_diff=rel(got[0], reference[0]), grad_h_diff=rel(got[1], reference[1]),
                               grad_w_diff=rel(got[2], reference[2]))
                del got
            except torch.OutOfMemoryError:
                row["oom"] = True
            if args.device == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"vocab {vocab} {impl}: {row}", flush=True)
        del h, w, labels, mask, reference
    print()
    print("| vocab | loss | fwd+bwd (ms) | peak above inputs (GiB) | max rel. diff loss / grad h / grad W vs megatron |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r.get("oom"):
            print(f"| {r['vocab']} | {r['impl']} | OOM | OOM | |")
            continue
        diff = (" / ".join(f"{r[k]:.1e}" for k in ("loss_diff", "grad_h_diff", "grad_w_diff"))
                if "loss_diff" in r else "")
        print(f"| {r['vocab']} | {r['impl']} | {r['ms']:.1f} | {r['peak_gib']:.2f} | {diff} |")
    return rows


if __name__ == "__main__":
    main()
