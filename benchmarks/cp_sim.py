"""One-GPU simulation of one rank of a context-parallel group: per-rank compute, memory, bytes.

    python benchmarks/cp_sim.py [--kv-heads 32] [--link-gbps 450] [--json benchmarks/results/cp_sim_h200.json]
    python benchmarks/cp_sim.py --tiny      # CPU, small sizes (a smoke test)
    python benchmarks/cp_sim.py --ring-backend sdpa   # force the ring steps' kernel (default auto)

Runs the real context-parallel layer (``ContextParallelAttention``: ring attention for the
full layer, the pattern-aware exchange for AttnSink and BlockSparse) for ONE rank of a CP
group of size CP, under torch's fake process group: every send and receive returns at once
with a correctly shaped (unfilled) buffer, so the rank does all of its compute and none of
the waiting. Llama-2 7B layer shapes (32 query heads, head dim 128, bf16, batch 1), forward
and backward, at (L, CP) = (128K, 8), (256K, 16), (512K, 32), (1M, 64): 16K tokens per rank.
The patterns are benchmarks/cp_comm.py's (the training defaults).

Reported per layer: per-rank compute time, peak memory, the bytes the rank sends (counted by
the CP code's byte counter, checked against the static plan), and a predicted time

    predicted = compute + communication that does not overlap,

with the link bandwidth an assumption (``--link-gbps``, GB/s per direction; 450 is one H200's
NVLink). The ring overlaps each hop with a step's compute, so its exposed time is
max(0, comm - compute x (CP-1)/CP) per phase; the exchange's all-to-all runs before the
attention and is all exposed (max of sent and received bytes over the link). The baseline is
the same layer on ONE GPU at 128K with the backend ``auto`` picks, measured in the same run:
an ideal CP split costs (one-GPU 128K time) x (pairs at L / pairs at 128K) / CP per rank.
Each row records the kernel that computed it (``backends``: the ring's dense-pair or chunk
backend, or the exchange's chunk backend).
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
import torch.distributed as dist  # noqa: E402

from benchmarks.cp_comm import HEAD_DIM, patterns  # noqa: E402
from megatron_longgen.attention.backends import (  # noqa: E402
    RING_BACKEND_ENV,
    chunk_backend,
    resolve_backend,
    ring_backend_names,
    ring_pair_backend,
)
from megatron_longgen.attention.patterns import (  # noqa: E402
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    allowed_pair_count,
)
from megatron_longgen.parallel.context_parallel import COMM, ContextParallelAttention  # noqa: E402
from megatron_longgen.parallel.cp.exchange import exchange_kernel  # noqa: E402
from megatron_longgen.parallel.cp.plan import exchange_plan, ring_bytes_sent  # noqa: E402
from megatron_longgen.utils.cli import fail, run_main  # noqa: E402

LAYOUTS = ((131072, 8), (262144, 16), (524288, 32), (1048576, 64))
HEADS = 32
TINY_LAYOUTS = ((128, 2), (256, 4))
PATTERN_NAMES = ("causal", "attn_sink", "block_sparse")


def layer_patterns(heads: int, kv_heads: int, tiny: bool):
    if tiny:
        return {"causal": CausalPattern(), "attn_sink": AttnSinkPattern(4, 32),
                "block_sparse": BlockSparsePattern(16, 2, 4, False, heads, kv_heads)}
    return {"causal": CausalPattern(), **patterns(heads, kv_heads)}


class FakeGroup:
    """Torch's fake process group as the CP group: rank ``rank`` of ``size``."""

    def __init__(self, size: int, rank: int):
        from torch.testing._internal.distributed.fake_pg import FakeStore

        self.size, self.rank = size, rank
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=size)

    def __enter__(self):
        return dist.group.WORLD

    def __exit__(self, *exc):
        dist.destroy_process_group()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, shapes, dtype, device, iters: int):
    """Median forward and forward+backward seconds of ``fn(q, k, v)``; peak bytes of one
    forward+backward (inputs included) and above the inputs; the bytes CP sent in it."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(s, generator=g, device=device, dtype=dtype).requires_grad_() for s in shapes[:3])
    grad = torch.randn(shapes[0], generator=g, device=device, dtype=dtype)

    def fwd():
        return fn(q, k, v)

    def full():
        fn(q, k, v).backward(grad)

    full()  # warm-up: compiles kernels, builds and caches the plans
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    COMM.reset()
    full()
    _sync(device)
    sent = {phase: COMM.total(phase=phase) for phase in ("fwd", "bwd")}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    times = {}
    for name, step in (("fwd", fwd), ("fwd_bwd", full)):
        samples = []
        for _ in range(iters):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            samples.append(time.perf_counter() - start)
        times[name] = sorted(samples)[len(samples) // 2]
    extra = peak - base if device.type == "cuda" else 0
    return times, peak, extra, sent


def plan_bytes(pattern, seq_len, cp, rank, kv_heads, head_dim, element_size):
    """(forward sent, forward received) bytes of the rank per the static plan."""
    if isinstance(pattern, CausalPattern):
        ring = ring_bytes_sent(seq_len, cp, 1, kv_heads, head_dim, element_size)
        return ring, ring
    plan = exchange_plan(pattern, seq_len, cp, rank, tuple(range(kv_heads)), None)  # the layer's cache key
    return plan.bytes_sent(1, head_dim, element_size), plan.bytes_received(1, head_dim, element_size)


def pair_count(pattern, seq_len: int, heads: int) -> int:
    """Allowed (query, key) pairs over [0, L) summed over heads: ``allowed_pair_count``, with
    BlockSparse in closed form per query block (the patterns module builds a blocks x blocks
    matrix per head, minutes at 1M)."""
    if not isinstance(pattern, BlockSparsePattern) or seq_len % pattern.block_size:
        return allowed_pair_count(pattern, seq_len, torch.arange(heads), heads)
    bs, local = pattern.block_size, pattern.local_blocks
    qb = torch.arange(seq_len // bs)
    offsets = pattern.head_offsets(torch.arange(heads))
    # The diagonal block (causal inside), the other local blocks, the vertical blocks before them.
    vertical = pattern.vertical_index((qb[None] - local + 1).clamp(min=0), offsets[:, None])
    blocks = qb.clamp(max=local - 1)[None] + vertical
    return int(bs * (bs + 1) // 2 * len(qb) * heads + bs * bs * blocks.sum())


def layer_backends(attn, pattern, device, dtype, head_dim) -> dict:
    """The kernels the CP layer ran (the layers here have no packed documents)."""
    if isinstance(pattern, CausalPattern):
        return {"ring": ring_pair_backend(device, dtype, head_dim, dense_layer=True).name}
    plan = next(iter(attn._static.values()))["plan"]
    kernel = exchange_kernel(plan, torch.empty(0, head_dim, device=device, dtype=dtype), None)
    if kernel is None:
        return {"exchange": chunk_backend(device, dtype, head_dim).name}
    kernels = {"exchange": f"{kernel.name} window + sinks"}
    if plan.sink_window.head_chunk is not None:
        kernels["first chunk"] = resolve_backend("auto", pattern, device).name
    return kernels


def predict(is_ring: bool, cp: int, times, comm_fwd: float, comm_bwd: float):
    """Seconds of the layer with communication at the assumed bandwidth (see module doc)."""
    fwd, bwd = times["fwd"], max(0.0, times["fwd_bwd"] - times["fwd"])
    if is_ring:
        hidden = (cp - 1) / cp
        exposed = max(0.0, comm_fwd - fwd * hidden) + max(0.0, comm_bwd - bwd * hidden)
    else:
        exposed = comm_fwd + comm_bwd
    return times["fwd_bwd"] + exposed, exposed


def write_json(args, device, records, baselines, ratios=None) -> None:
    """The records so far (rewritten after every row: a run cut short keeps its rows)."""
    if not args.json:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "kv_heads": args.kv_heads, "link_gbps": args.link_gbps, "rank": args.rank,
            "iters": args.iters, "ring_backend": args.ring_backend}
    with open(args.json, "w") as f:
        json.dump({**meta, "baselines": baselines, "hybrid_over_full": ratios, "records": records},
                  f, indent=1)


def simulate(args, device, dtype):
    layouts = TINY_LAYOUTS if args.tiny else tuple(LAYOUTS[:args.max_layouts])
    heads, kv_heads, d = (4, 2, 16) if args.tiny else (HEADS, args.kv_heads, HEAD_DIM)
    base_len, base_cp = layouts[0]
    element = torch.empty(0, dtype=dtype).element_size()
    scale = d ** -0.5
    bw = args.link_gbps * 1e9
    records, baselines = [], {}
    for name, pattern in layer_patterns(heads, kv_heads, args.tiny).items():
        if name not in args.patterns:
            continue
        backend = resolve_backend("auto", pattern, device)
        fn = lambda q, k, v, p=pattern, b=backend: b.fn(q, k, v, pattern=p, heads=torch.arange(heads),  # noqa: E731
                                                        scale=scale)
        shapes = ((1, heads, base_len, d), (1, kv_heads, base_len, d), (1, kv_heads, base_len, d))
        times, peak, _, _ = time_fwd_bwd(fn, shapes, dtype, device, args.iters)
        baselines[name] = {"backend": backend.name, "seq_len": base_len, "fwd_bwd_ms": times["fwd_bwd"] * 1e3,
                           "peak_gib": peak / 2 ** 30}
        base_pairs = pair_count(pattern, base_len, heads)
        for seq_len, cp in layouts:
            c2 = seq_len // cp
            with FakeGroup(cp, args.rank) as group:
                attn = ContextParallelAttention(pattern, torch.arange(heads), tuple(range(kv_heads)), scale,
                                                group, layer_number=1)
                start = time.perf_counter()
                sent, received = plan_bytes(pattern, seq_len, cp, args.rank, kv_heads, d, element)
                plan_s = time.perf_counter() - start
                shapes = ((1, heads, c2, d), (1, kv_heads, c2, d), (1, kv_heads, c2, d))
                times, peak, extra, counted = time_fwd_bwd(attn, shapes, dtype, device, args.iters)
            fwd_bytes, bwd_bytes = counted["fwd"], counted["bwd"]
            if fwd_bytes != sent:
                raise RuntimeError(f"{name} L {seq_len} CP {cp}: the layer sent {fwd_bytes} bytes "
                                   f"forward, the plan says {sent}")
            is_ring = isinstance(pattern, CausalPattern)
            comm_fwd = max(sent, received) / bw
            comm_bwd = (bwd_bytes if is_ring else max(sent, received)) / bw
            predicted, exposed = predict(is_ring, cp, times, comm_fwd, comm_bwd)
            pairs = pair_count(pattern, seq_len, heads)
            ideal = baselines[name]["fwd_bwd_ms"] * pairs / base_pairs / cp
            records.append({
                "pattern": name, "seq_len": seq_len, "cp": cp, "rank": args.rank,
                "backends": layer_backends(attn, pattern, device, dtype, d),
                "tokens_per_rank": c2, "fwd_ms": times["fwd"] * 1e3, "fwd_bwd_ms": times["fwd_bwd"] * 1e3,
                "peak_gib": peak / 2 ** 30, "peak_over_inputs_gib": extra / 2 ** 30,
                "fwd_bytes_sent": int(fwd_bytes), "fwd_bytes_received": int(received),
                "bwd_bytes_sent": int(bwd_bytes), "plan_s": plan_s,
                "exposed_comm_ms": exposed * 1e3, "predicted_ms": predicted * 1e3,
                "ideal_ms": ideal, "vs_ideal": times["fwd_bwd"] * 1e3 / ideal,
            })
            print(f"  {name} L {_length(seq_len)} CP {cp}: {times['fwd_bwd'] * 1e3:.1f} ms", flush=True)
            write_json(args, device, records, baselines)
    return records, baselines


def hybrid_ratio(records, base_len, base_cp):
    """Predicted tokens/s/GPU of a hybrid stack (1/3 full, 2/3 sparse layers) over an
    all-full stack, attention layers only, at the first layout."""
    at = {r["pattern"]: r["predicted_ms"] for r in records if (r["seq_len"], r["cp"]) == (base_len, base_cp)}
    full = at["causal"]
    return {name: full / (full / 3 + 2 * at[name] / 3) for name in ("attn_sink", "block_sparse")}


def _length(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 else str(n)


def print_table(records, baselines, args):
    print(f"One CP rank (rank {args.rank}) per layer, fwd+bwd; link {args.link_gbps} GB/s per direction")
    for name, b in baselines.items():
        print(f"  one GPU, {name}, L {b['seq_len']}: {b['fwd_bwd_ms']:.1f} ms ({b['backend']}), "
              f"peak {b['peak_gib']:.2f} GiB")
    print("| pattern | L | CP | kernel | compute ms | ideal ms (1-GPU pairs / CP) | x ideal | peak GiB | "
          "fwd MB sent | fwd MB recv | bwd MB sent | exposed comm ms | predicted ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        kernel = ", ".join(f"{k} {v}" for k, v in r["backends"].items())
        print(f"| {r['pattern']} | {_length(r['seq_len'])} | {r['cp']} | {kernel} | {r['fwd_bwd_ms']:.1f} | "
              f"{r['ideal_ms']:.1f} | {r['vs_ideal']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['fwd_bytes_sent'] / 1e6:.1f} | {r['fwd_bytes_received'] / 1e6:.1f} | "
              f"{r['bwd_bytes_sent'] / 1e6:.1f} | {r['exposed_comm_ms']:.1f} | {r['predicted_ms']:.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kv-heads", type=int, default=32, choices=(8, 32),
                        help="KV heads of the 7B-shaped layer (32: Llama-2 7B; 8: GQA)")
    parser.add_argument("--link-gbps", type=float, default=450.0,
                        help="assumed link bandwidth per direction in GB/s for the predicted time "
                             "(450: H200 NVLink; about 50 for 400 Gb/s InfiniBand between nodes)")
    parser.add_argument("--rank", type=int, default=0,
                        help="the simulated CP rank (0 holds the first and last chunk: the most "
                             "exchange rows to receive)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed iterations per measurement, median (default 3; 1 with --tiny)")
    parser.add_argument("--max-layouts", type=int, default=len(LAYOUTS),
                        help="run only the first N of (128K, 8), (256K, 16), (512K, 32), (1M, 64)")
    parser.add_argument("--tiny", action="store_true",
                        help="small sizes on CPU in float32 (a smoke test of the method)")
    parser.add_argument("--ring-backend", default="auto", choices=("auto",) + ring_backend_names(),
                        help=f"kernel of the full layer's ring steps (sets ${RING_BACKEND_ENV}): a "
                             "dense-pair backend, or a chunk backend for every pair; auto: the "
                             "registry's choice (FA4, else SDPA, on CUDA)")
    parser.add_argument("--patterns", nargs="+", default=list(PATTERN_NAMES), choices=PATTERN_NAMES,
                        metavar="PATTERN", help=f"layers to simulate, of {', '.join(PATTERN_NAMES)} "
                                                "(default all; the hybrid ratio needs all three)")
    parser.add_argument("--json", default=None, help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if not args.tiny and not torch.cuda.is_available():
        fail("cp_sim.py needs a CUDA GPU (or --tiny for the CPU smoke run)")
    if args.link_gbps <= 0:
        fail(f"--link-gbps must be positive, got {args.link_gbps}")
    if not 1 <= args.max_layouts <= len(LAYOUTS):
        fail(f"--max-layouts must be 1 to {len(LAYOUTS)}, got {args.max_layouts}")
    layouts = TINY_LAYOUTS if args.tiny else LAYOUTS[:args.max_layouts]
    if not 0 <= args.rank < min(cp for _, cp in layouts):
        fail(f"--rank {args.rank} is not a rank of every simulated CP group (smallest: "
             f"{min(cp for _, cp in layouts)})")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    args.iters = args.iters or (1 if args.tiny else 3)
    if args.iters < 1:
        fail(f"--iters must be at least 1, got {args.iters}")
    previous = os.environ.get(RING_BACKEND_ENV)
    if args.ring_backend != "auto":
        os.environ[RING_BACKEND_ENV] = args.ring_backend
    try:
        records, baselines = simulate(args, device, dtype)
    finally:  # the setting is this run's only (tests call main in-process)
        if previous is None:
            os.environ.pop(RING_BACKEND_ENV, None)
        else:
            os.environ[RING_BACKEND_ENV] = previous
    print_table(records, baselines, args)
    ratios = hybrid_ratio(records, *layouts[0]) if set(args.patterns) == set(PATTERN_NAMES) else None
    if ratios:
        print("predicted hybrid / full tokens/s/GPU (attention layers only, first layout): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    write_json(args, device, records, baselines, ratios)

if __name__ == "__main__":
    run_main(main)
