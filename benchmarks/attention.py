"""Attention kernels on GPU: correctness of the Triton kernels, then a timing table.

    python benchmarks/attention.py [--lengths 16384 32768 65536 131072] [--kv-heads 32 8]
                                   [--backends sdpa flex triton fa4] [--skip-check]
                                   [--tune [attn_sink] [block_sparse]] [--compare]
                                   [--json results.json]

Batch 1, 32 query heads, head dim 128, bf16. For each length and KV-head count it times the
forward and forward+backward of SDPA causal (dense), FlexAttention and our Triton kernel on
AttnSink (sink 64, window 4096) and BlockSparse (block 64, 16 local blocks, vertical stride 8,
heterogeneous heads), and, where flash-attn-4 is installed, its backend (``attention/fa4.py``)
on causal and AttnSink. TFLOP/s count only allowed pairs: forward 4 * pairs * d, forward+backward
3.5x that (the backward's five matrix products are 2.5x the forward's two).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_longgen.attention import fa4  # noqa: E402
from megatron_longgen.attention.flex import flex_attention_backend  # noqa: E402
from megatron_longgen.attention.patterns import (  # noqa: E402
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    allowed_pair_count,
    token_mask,
)
from megatron_longgen.attention.reference import masked_attention  # noqa: E402
from megatron_longgen.attention.triton_kernels import sparse_attention  # noqa: E402

HEADS, DIM = 32, 128


_START = time.time()


def say(*args):
    print(f"[{time.time() - _START:5.0f}s]", *args, flush=True)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check_against_reference():
    """Triton vs the float64 reference at moderate sizes: output, LSE, dq, dk, dv."""
    dev = "cuda"
    seq_len, hq, hkv = 1061, 8, 2  # odd length: tail tiles
    cases = [
        ("causal", CausalPattern(), None),
        ("sink", AttnSinkPattern(64, 256), None),
        ("block_sparse", BlockSparsePattern(64, 4, 4, False, hq, hkv), None),
        ("sink+docs", AttnSinkPattern(64, 256), [0, 300, 301, 777, seq_len]),
        ("block_sparse+docs", BlockSparsePattern(64, 4, 4, False, hq, hkv), [0, 300, 301, 777, seq_len]),
    ]
    # float32 compiles slowly (no tensor cores) and is covered by the CPU tests: two cases here.
    runs = [(dim, dtype, tol, case) for dim in (64, 128)
            for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float16, 1e-2)) for case in cases]
    runs += [(64, torch.float32, 1e-4, cases[i]) for i in (1, 4)]
    worst = 0.0
    for dim, dtype, tol, (name, pattern, docs) in runs:
        torch.manual_seed(0)
        q = torch.randn(1, hq, seq_len, dim, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, hkv, seq_len, dim, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, hkv, seq_len, dim, device=dev, dtype=dtype, requires_grad=True)
        heads = torch.arange(hq)
        cu = torch.tensor(docs) if docs else None
        out, lse = sparse_attention(q, k, v, pattern, heads, dim ** -0.5, cu_seqlens=cu,
                                    return_lse=True)
        d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
        ((out.float() * d_out.float()).sum() + (lse * d_lse).sum()).backward()
        mask = token_mask(pattern, seq_len, heads, cu_seqlens=cu, num_heads=hq).to(dev)
        q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ro, rl = masked_attention(q64, k64, v64, mask[None], dim ** -0.5)
        ((ro * d_out.double()).sum() + (rl * d_lse.double()).sum()).backward()
        errs = [rel_err(a, b) for a, b in [(out, ro), (lse, rl), (q.grad, q64.grad),
                                           (k.grad, k64.grad), (v.grad, v64.grad)]]
        ok = max(errs) < tol and all(torch.isfinite(t).all() for t in (out, q.grad, k.grad, v.grad))
        worst = max(worst, max(errs) / tol)
        say(f"check d={dim} {str(dtype)[6:]:8s} {name:18s} out/lse/dq/dk/dv rel err "
            + " ".join(f"{e:.1e}" for e in errs) + ("  ok" if ok else "  FAIL"))
        assert ok, name
    say(f"reference check passed (worst error / tolerance = {worst:.2f})")


def bench(fn, backward, inputs):
    import triton

    q, k, v = inputs
    if not backward:
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(q, k, v), warmup=50, rep=300, return_mode="median")
    do = torch.randn_like(q)

    def step():
        fn(q, k, v).backward(do)

    return triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=[q, k, v], return_mode="median")


def make_fns(pattern, heads, flex_block):
    scale = DIM ** -0.5
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    flex = lambda q, k, v: flex_attention_backend(  # noqa: E731
        q, k, v, pattern=pattern, heads=heads, scale=scale, block_size=flex_block)
    ours = lambda q, k, v: sparse_attention(q, k, v, pattern, heads, scale)  # noqa: E731
    return sdpa, flex, ours


def fa4_fn(pattern, heads):
    """The fa4 backend on ``pattern``, or None where flash-attn-4 cannot run it here."""
    if not (fa4.fa4_installed() and fa4.supports(pattern, torch.device("cuda"))):
        return None
    return lambda q, k, v: fa4.fa4_attention(  # noqa: E731
        q, k, v, pattern=pattern, heads=heads, scale=DIM ** -0.5)


def cross_check(seq_len, hkv, flex_block):
    """Our kernel vs Flex (and SDPA for causal) in bf16 at one long size."""
    heads = torch.arange(HEADS)
    q, k, v = inputs_for(seq_len, hkv)
    for pattern in (AttnSinkPattern(64, 4096), BlockSparsePattern(64, 16, 8, False, HEADS, hkv)):
        _, flex, ours = make_fns(pattern, heads, flex_block)
        with torch.no_grad():
            say(f"cross-check L={seq_len} hkv={hkv} {pattern.name}: triton vs flex rel err "
                f"{rel_err(ours(q, k, v), flex(q, k, v)):.1e}")
    sdpa, _, ours = make_fns(CausalPattern(), heads, flex_block)
    with torch.no_grad():
        say(f"cross-check L={seq_len} hkv={hkv} causal: triton vs sdpa rel err "
            f"{rel_err(ours(q, k, v), sdpa(q, k, v)):.1e}")


def inputs_for(seq_len, hkv):
    torch.manual_seed(0)
    mk = lambda h: torch.randn(1, h, seq_len, DIM, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                               requires_grad=True)
    return mk(HEADS), mk(hkv), mk(hkv)


def run_table(lengths, kv_heads, flex_block, only=("sdpa", "flex", "triton", "fa4"),
              json_path=None):
    rows = []
    heads = torch.arange(HEADS)
    say(f"{'L':>7} {'hkv':>3} {'pattern':12} {'backend':7} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'fwd TF/s':>9} {'f+b TF/s':>9}")
    for seq_len in lengths:
        for hkv in kv_heads:
            inputs = inputs_for(seq_len, hkv)
            patterns = [CausalPattern(), AttnSinkPattern(64, 4096),
                        BlockSparsePattern(64, 16, 8, False, HEADS, hkv)]
            for pattern in patterns:
                pairs = allowed_pair_count(pattern, seq_len, heads, num_heads=HEADS)
                sdpa, flex, ours = make_fns(pattern, heads, flex_block)
                # Dense causal is SDPA's job (backends.py never routes it to our kernel).
                backends = ([("sdpa", sdpa)] if pattern.name == "causal"
                            else [("flex", flex), ("triton", ours)])
                backends.append(("fa4", fa4_fn(pattern, heads)))
                for name, fn in backends:
                    if name not in only or fn is None:
                        continue
                    t0 = time.time()
                    fwd = bench(fn, False, inputs)
                    both = bench(fn, True, inputs)
                    flops = 4 * pairs * DIM
                    row = dict(L=seq_len, hkv=hkv, pattern=pattern.name, backend=name, fwd_ms=fwd,
                               fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                               fwd_bwd_tflops=3.5 * flops / both / 1e9, pairs=pairs)
                    rows.append(row)
                    if json_path:  # after every row: a long run that is cut short keeps its rows
                        with open(json_path, "w") as f:
                            json.dump(rows, f, indent=1)
                    say(f"{seq_len:>7} {hkv:>3} {pattern.name:12} {name:7} {fwd:9.2f} {both:11.2f} "
                        f"{row['fwd_tflops']:9.0f} {row['fwd_bwd_tflops']:9.0f}   ({time.time() - t0:.0f}s)")
            del inputs
            torch.cuda.empty_cache()
    return rows


# Variants swept by --tune: changes to the default Tiles. Names: pass, query x key tile,
# warps, pipeline stages. 128-wide key tiles are for AttnSink only: BlockSparse's vertical
# blocks are 64 wide, so a 128-wide key tile would compute twice the pairs there.
FWD_VARIANTS = {
    "fwd 128x64 w8 s3": dict(fwd_m=128, fwd_n=64, fwd_launch=(8, 3)),
    "fwd 128x64 w8 s4": dict(fwd_m=128, fwd_n=64, fwd_launch=(8, 4)),
    "fwd 64x64 w4 s3": dict(fwd_m=64, fwd_n=64, fwd_launch=(4, 3)),
    "fwd 128x128 w8 s2": dict(fwd_m=128, fwd_n=128, fwd_launch=(8, 2)),
    "fwd 128x128 w8 s3": dict(fwd_m=128, fwd_n=128, fwd_launch=(8, 3)),
}
BWD_VARIANTS = {
    "dkdv 64x64 w4 s3 | dq 64x64 w4 s3": dict(dkdv_m=64, dkdv_n=64, dkdv_launch=(4, 3),
                                              dq_m=64, dq_n=64, dq_launch=(4, 3)),
    "dkdv 32x64 w4 s3 | dq 64x64 w4 s3": dict(dkdv_m=32, dkdv_n=64, dkdv_launch=(4, 3)),
    "dkdv 32x64 w4 s4 | dq 64x64 w4 s3": dict(dkdv_m=32, dkdv_n=64, dkdv_launch=(4, 4)),
    "dkdv 32x64 w4 s3 | dq 64x32 w4 s3": dict(dkdv_m=32, dkdv_n=64, dkdv_launch=(4, 3),
                                              dq_m=64, dq_n=32, dq_launch=(4, 3)),
    "dkdv 32x64 w4 s3 | dq 128x64 w8 s3": dict(dkdv_m=32, dkdv_n=64, dkdv_launch=(4, 3),
                                               dq_m=128, dq_n=64, dq_launch=(8, 3)),
    "dkdv 32x64 w4 s3 | dq 128x64 w8 s2": dict(dkdv_m=32, dkdv_n=64, dkdv_launch=(4, 3),
                                               dq_m=128, dq_n=64, dq_launch=(8, 2)),
    "dkdv 32x128 w8 s3 | dq 64x64 w4 s3": dict(dkdv_m=32, dkdv_n=128, dkdv_launch=(8, 3)),
    "dkdv 32x128 w8 s3 | dq 64x32 w4 s3": dict(dkdv_m=32, dkdv_n=128, dkdv_launch=(8, 3),
                                               dq_m=64, dq_n=32, dq_launch=(4, 3)),
    "dkdv 32x128 w8 s3 | dq 128x64 w8 s3": dict(dkdv_m=32, dkdv_n=128, dkdv_launch=(8, 3),
                                                dq_m=128, dq_n=64, dq_launch=(8, 3)),
    "dkdv 32x128 w8 s2 | dq 64x32 w4 s3": dict(dkdv_m=32, dkdv_n=128, dkdv_launch=(8, 2),
                                               dq_m=64, dq_n=32, dq_launch=(4, 3)),
}


def _sink_only(change):
    return change.get("fwd_n") == 128 or change.get("dkdv_n") == 128


def tune(pattern_names=("attn_sink", "block_sparse"), seq_len=32768, hkv=8):
    """Sweep tile sizes and launch settings of each pass at one length, check every variant
    against the default's output and gradients, and return the fastest variant per pattern."""
    from megatron_longgen.attention.triton_kernels import DEFAULT_TILES

    heads, scale = torch.arange(HEADS), DIM ** -0.5
    q, k, v = inputs_for(seq_len, hkv)
    d_out = torch.randn_like(q)
    best = {}
    patterns = (AttnSinkPattern(64, 4096), BlockSparsePattern(64, 16, 8, False, HEADS, hkv))
    for pattern in (p for p in patterns if p.name in pattern_names):
        def grads(tiles):
            for x in (q, k, v):
                x.grad = None
            out = sparse_attention(q, k, v, pattern, heads, scale, tiles=tiles)
            out.backward(d_out)
            return [out.detach().clone()] + [x.grad.clone() for x in (q, k, v)]

        want = grads(DEFAULT_TILES)
        timed = {}
        for label, variants, backward in (("fwd", FWD_VARIANTS, False), ("bwd", BWD_VARIANTS, True)):
            for name, change in variants.items():
                if _sink_only(change) and not isinstance(pattern, AttnSinkPattern):
                    continue
                tiles = dataclasses.replace(DEFAULT_TILES, **change)
                fn = lambda q, k, v: sparse_attention(q, k, v, pattern, heads, scale, tiles=tiles)  # noqa: E731
                try:
                    errs = [rel_err(a, b) for a, b in zip(grads(tiles), want)]
                    ms = bench(fn, backward, (q, k, v))
                except Exception as e:  # noqa: BLE001 - a config that does not fit is skipped
                    say(f"tune L={seq_len} {pattern.name:12} {name}: fails ({type(e).__name__}: {str(e)[:80]})")
                    continue
                ok = max(errs) < 2e-2
                say(f"tune L={seq_len} {pattern.name:12} {name:38s} {'fwd' if not backward else 'fwd+bwd'} "
                    f"{ms:8.2f} ms   vs default out/dq/dk/dv {' '.join(f'{e:.0e}' for e in errs)}"
                    + ("" if ok else "  WRONG"))
                if ok:
                    timed[(label, name)] = ms
        pick = {}
        for label in ("fwd", "bwd"):
            name = min((n for (lb, n) in timed if lb == label), key=lambda n: timed[(label, n)])
            pick.update((FWD_VARIANTS if label == "fwd" else BWD_VARIANTS)[name])
            say(f"tune best {label} for {pattern.name}: {name} ({timed[(label, name)]:.2f} ms)")
        best[pattern.name] = dataclasses.replace(DEFAULT_TILES, **pick)
    del q, k, v
    torch.cuda.empty_cache()
    return best


def compare_tiles(seq_len, hkv, flex_block):
    """DEFAULT_TILES vs the per-pattern defaults vs Flex (and SDPA causal) at one length."""
    from megatron_longgen.attention.triton_kernels import DEFAULT_TILES, default_tiles

    heads, scale = torch.arange(HEADS), DIM ** -0.5
    inputs = inputs_for(seq_len, hkv)
    sdpa, _, _ = make_fns(CausalPattern(), heads, flex_block)
    causal_pairs = allowed_pair_count(CausalPattern(), seq_len, heads, num_heads=HEADS)
    rows = [("causal", "sdpa", sdpa, causal_pairs)]
    fa4_fns = {p.name: fa4_fn(p, heads) for p in (CausalPattern(), AttnSinkPattern(64, 4096))}
    if fa4_fns["causal"] is not None:
        rows.append(("causal", "fa4", fa4_fns["causal"], causal_pairs))
    for pattern in (AttnSinkPattern(64, 4096), BlockSparsePattern(64, 16, 8, False, HEADS, hkv)):
        pairs = allowed_pair_count(pattern, seq_len, heads, num_heads=HEADS)
        _, flex, _ = make_fns(pattern, heads, flex_block)
        rows.append((pattern.name, "flex", flex, pairs))
        if fa4_fns.get(pattern.name) is not None:
            rows.append((pattern.name, "fa4", fa4_fns[pattern.name], pairs))
        for label, tiles in (("ours DEFAULT_TILES", DEFAULT_TILES),
                             ("ours tuned", default_tiles(pattern, torch.bfloat16))):
            fn = (lambda t, p: lambda q, k, v: sparse_attention(q, k, v, p, heads, scale, tiles=t))(tiles, pattern)
            rows.append((pattern.name, label, fn, pairs))
    say(f"\n{'L':>7} {'hkv':>3} {'pattern':12} {'backend':19} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'fwd TF/s':>9} {'f+b TF/s':>9}")
    results = []
    for pattern_name, label, fn, pairs in rows:
        fwd, both = bench(fn, False, inputs), bench(fn, True, inputs)
        flops = 4 * pairs * DIM
        results.append(dict(L=seq_len, hkv=hkv, pattern=pattern_name, backend=label, fwd_ms=fwd,
                            fwd_bwd_ms=both, fwd_tflops=flops / fwd / 1e9,
                            fwd_bwd_tflops=3.5 * flops / both / 1e9))
        r = results[-1]
        say(f"{seq_len:>7} {hkv:>3} {pattern_name:12} {label:19} {fwd:9.2f} {both:11.2f} "
            f"{r['fwd_tflops']:9.0f} {r['fwd_bwd_tflops']:9.0f}")
    by = {(r["pattern"], r["backend"]): r for r in results}
    sdpa_tflops = by[("causal", "sdpa")]["fwd_bwd_tflops"]
    for name, target in (("attn_sink", 1.2), ("block_sparse", 2.0)):
        ours, flex = by[(name, "ours tuned")], by[(name, "flex")]
        say(f"{name}: fwd+bwd ours tuned {flex['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x Flex "
            f"(target {target}x), {ours['fwd_bwd_tflops'] / sdpa_tflops:.0%} of SDPA causal's "
            f"TFLOP/s per allowed pair (target 75%)")
    for name, other in (("causal", "sdpa"), ("attn_sink", "ours tuned")):
        if (name, "fa4") in by:  # auto's order on cuda (attention/backends.py) rests on these
            speedup = by[(name, other)]["fwd_bwd_ms"] / by[(name, "fa4")]["fwd_bwd_ms"]
            say(f"{name}: fwd+bwd fa4 {speedup:.2f}x {other}")
    return results


def try_flex_block_64():
    """Flex with a mask block of 64 (matches the sparse block); report whether it compiles."""
    pattern = BlockSparsePattern(64, 16, 8, False, HEADS, 8)
    _, flex, _ = make_fns(pattern, torch.arange(HEADS), 64)
    q, k, v = inputs_for(16384, 8)
    for what in ("forward", "forward+backward"):
        try:
            out = flex(q, k, v)
            if what == "forward+backward":
                out.sum().backward()
            torch.cuda.synchronize()
            say(f"flex BLOCK_SIZE=64 {what}: ok")
        except Exception as e:  # noqa: BLE001 - report and go on with 128
            say(f"flex BLOCK_SIZE=64 {what}: fails ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            return


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--flex-block", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "flex", "triton", "fa4"],
                        help="backends of the table (fa4 only where flash-attn-4 is installed)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--try-flex-64", action="store_true")
    parser.add_argument("--tune", nargs="*", choices=["attn_sink", "block_sparse"], default=None,
                        help="sweep tiles at 32K (8 KV heads) for these patterns (default both), "
                             "print the fastest per pattern, exit")
    parser.add_argument("--compare", action="store_true",
                        help="time SDPA causal, Flex, ours with DEFAULT_TILES and with the tuned "
                             "defaults, and fa4 on causal and AttnSink where flash-attn-4 is "
                             "installed, at the last --lengths and --kv-heads, then exit")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    say(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}")
    if not args.skip_check:
        check_against_reference()
        cross_check(16384, 8, args.flex_block)
    if args.try_flex_64:
        try_flex_block_64()
    rows = None
    if args.tune is not None:
        best = tune(args.tune or ("attn_sink", "block_sparse"))
        for name, tiles in best.items():
            say(f"tuned tiles for {name}: {tiles}")
        rows = {name: dataclasses.asdict(tiles) for name, tiles in best.items()}
    # One compiled Flex graph per (shape, pattern): more than dynamo's default cache of 8.
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    if args.compare:
        rows = compare_tiles(args.lengths[-1], args.kv_heads[-1], args.flex_block)
    elif args.tune is None:
        rows = run_table(args.lengths, args.kv_heads, args.flex_block, args.backends, args.json)
    if args.json and rows is not None:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)

if __name__ == "__main__":
    main()
