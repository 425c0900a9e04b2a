"""Where prefill and decode time goes: CUDA kernel time by kind, from torch.profiler.

    python benchmarks/profile_inference.py                     # hybrid AttnSink and full, 32K
    python benchmarks/profile_inference.py --length 131072 --variants "hybrid attn_sink"

Same models and engine settings as ``benchmarks/inference.py``. Prefill is profiled on the
second prompt of its length, decode on one eager step (no CUDA graph, so the kernels are
attributable; a replayed graph runs the same kernels without the launch gaps). Prints, per
model, the kernel time of each kind (matrix products, attention, norms, RoPE, ...) and the
slowest kernels, next to the wall time of the same call.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.inference import VARIANTS, build, say, sync  # noqa: E402
from megatron_longgen.inference.engine import InferenceEngine  # noqa: E402
from megatron_longgen.inference.layer_ops import finish_layer, norm, project_qkv  # noqa: E402
from megatron_longgen.parallel.initialize import initialize_parallel  # noqa: E402

# First match wins; names are CUDA kernel names as the profiler reports them.
KINDS = [
    ("fused decode (ours)", r"_rope_qkv_kernel|_add_norm_kernel|_write_token_kernel"),
    # models/fused_ops.py (training and inference) and the chunked loss's kernels
    ("fused norm/RoPE/SwiGLU (ours)", r"_rms_norm_|_qkv_rope_kernel|_rope_kernel|_swiglu_"),
    ("loss: chunked cross-entropy (ours)", r"_chunk_lse_kernel|_chunk_grad_kernel"),
    ("attention: SDPA/flash", r"flash|fmha|cudnn"),  # before matmul: FA4's names say cutlass
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitKreduce"),
    ("attention: ours (Triton)", r"_attn_fwd|_fwd_kernel|block_sparse|_sparse"),
    ("attention: decode", r"decode|_merge"),
    ("norm", r"norm"),
    ("optimizer", r"foreach|multi_tensor|adam"),
    ("copy/cat/index", r"copy|cat|index|gather|scatter|elementwise_kernel_with_index|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def kernel_table(prof, wall_s: float, top: int) -> None:
    by_kind, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = e.device_time_total / 1e6  # us -> s
        by_kind[kind_of(e.key)] += t
        by_name[e.key][0] += t
        by_name[e.key][1] += e.count
    total = sum(by_kind.values())
    print(f"\nwall {wall_s * 1e3:.2f} ms, kernels {total * 1e3:.2f} ms "
          f"(gaps {max(wall_s - total, 0) * 1e3:.2f} ms)")
    print("| kind | ms | share |\n|---|---:|---:|")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t * 1e3:.2f} | {t / total:.1%} |")
    print(f"\n| slowest kernels | calls | ms |\n|---|---:|---:|")
    for name, (t, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name[:90]} | {n} | {t * 1e3:.2f} |")


def profiled(fn, device):
    fn()  # warm: kernel compilation, tile lists, cuBLAS handles
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    return prof, wall


@torch.no_grad()
def check_fused(model, device) -> None:
    """The fused kernels against the modules they replace, on the first layer (bf16)."""
    layer = model.decoder.layers[0]
    attn = layer.self_attention
    x = torch.randn(4096, 1, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    freqs = torch.rand(1, 1, 4096, attn.hidden_size_per_attention_head, device=device) * 1e4
    pairs = {
        "rms_norm": (norm(layer.input_layernorm, x, fused=True), layer.input_layernorm(x)),
        "mlp": (finish_layer(layer, x, x, fused=True), finish_layer(layer, x, x)),
    }
    for name, got, ref in zip("qkv", project_qkv(attn, x, freqs, False, fused=True),
                              project_qkv(attn, x, freqs, False)):
        pairs[f"rope {name}"] = (got, ref)
    for name, (got, ref) in pairs.items():
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print(f"fused {name}: max |fused - module| / max |module| = {err:.2e}")
        assert err < 2e-2, name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--decode-length", type=int, default=16384)
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--variants", nargs="+", default=["hybrid attn_sink", "full"], choices=list(VARIANTS))
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--no-decode", action="store_true", help="profile the prefill only")
    args = p.parse_args(argv)
    args.device, args.tiny = "cuda", False
    device = torch.device("cuda")
    initialize_parallel(device="cuda")
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for variant in args.variants:
        model, vocab = build(args, variant, max(args.length, args.decode_length) + 8)
        engine = InferenceEngine(model, max_length=max(args.length, args.decode_length) + 8,
                                 chunk_size=args.chunk_size, cuda_graphs=False)
        check_fused(model, device)
        prompt = torch.randint(0, vocab, (1, args.length), device=device)
        prof, wall = profiled(lambda: engine.prefill(prompt), device)
        print(f"\n## {variant}: prefill of {args.length} tokens")
        kernel_table(prof, wall, args.top)
        if args.no_decode:
            del engine, model
            torch.cuda.empty_cache()
            continue
        prompt = torch.randint(0, vocab, (1, args.decode_length), device=device)
        cache, logits = engine.prefill(prompt)
        tokens = logits.argmax(-1)
        prof, wall = profiled(lambda: engine.decode(cache, tokens), device)
        print(f"\n## {variant}: one eager decode step at {args.decode_length} tokens")
        kernel_table(prof, wall, args.top)
        del cache, logits, engine, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
