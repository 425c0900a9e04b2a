"""Attention-layer cases for the context-parallel tests, and the worker that runs them on
spawned gloo ranks. Every rank also computes the unsharded (CP=1) reference itself."""

import json
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern, token_mask
from megatron_longgen.attention.reference import masked_attention

SEQ = 64
DOCS = (0, 13, 40, 64)  # packed documents: boundaries cut through chunks at CP=2 and CP=4


@dataclass(frozen=True)
class Case:
    name: str
    pattern: object
    heads: Tuple[int, ...]  # global query heads held here (a TP rank's slice)
    kv_heads: Tuple[int, ...]
    num_heads: int
    batch: int = 2
    docs: Optional[Tuple[int, ...]] = None
    head_dim: int = 8


def _bs(homo, heads, groups, stride=4):
    return BlockSparsePattern(block_size=4, local_blocks=2, vert_stride=stride, homo_head=homo,
                              num_heads=heads, num_query_groups=groups)


CASES = [
    Case("full_mha", CausalPattern(), (0, 1, 2, 3), (0, 1, 2, 3), 4),
    Case("full_gqa_packed", CausalPattern(), (0, 1, 2, 3), (0, 1), 4, batch=1, docs=DOCS),
    Case("sink_gqa", AttnSinkPattern(3, 6), (0, 1, 2, 3), (0, 1), 4),
    Case("sink_window_over_chunks", AttnSinkPattern(2, 21), (0, 1, 2, 3), (0, 1), 4),
    Case("sink_packed", AttnSinkPattern(2, 10), (0, 1, 2, 3), (0, 1), 4, batch=1, docs=DOCS),
    Case("block_homo", _bs(True, 4, 2, stride=3), (0, 1, 2, 3), (0, 1), 4),
    # Heterogeneous heads, GQA, and the second TP rank's slice of 8 heads / 4 groups.
    Case("block_hetero_tp_slice", _bs(False, 8, 4), (4, 5, 6, 7), (2, 3), 8),
    Case("block_hetero_packed", _bs(False, 4, 4), (0, 1, 2, 3), (0, 1, 2, 3), 4, batch=1, docs=DOCS),
    # Fewer groups than the stride: each of 3 groups reads 3 blocks in every 8 (cover rule).
    Case("block_cover_few_groups", _bs(False, 6, 3, stride=8), tuple(range(6)), (0, 1, 2), 6),
]


def case_tensors(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = len(case.heads), len(case.kv_heads), case.head_dim
    q = torch.randn(case.batch, hq, SEQ, d, generator=g)
    k = torch.randn(case.batch, hkv, SEQ, d, generator=g)
    v = torch.randn(case.batch, hkv, SEQ, d, generator=g)
    w = torch.randn(case.batch, hq, SEQ, d, generator=g)  # loss weights: d(loss)/d(out)
    return q, k, v, w


def reference(case: Case, q, k, v, w):
    """The unsharded layer (CP=1): output and q/k/v gradients of sum(out * w)."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    cu = torch.tensor(case.docs) if case.docs else None
    mask = token_mask(case.pattern, SEQ, list(case.heads), cu, num_heads=len(case.heads))
    out, _ = masked_attention(q, k, v, mask[None], case.head_dim ** -0.5)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def layer_worker(rank, world, port, out_dir, exchange_backend=""):
    """``exchange_backend``: sets $LONGGEN_CP_EXCHANGE_BACKEND in the rank (dense_reference runs
    the AttnSink exchange's sink-window path on CPU)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if exchange_backend:
        from megatron_longgen.attention.backends import EXCHANGE_BACKEND_ENV

        os.environ[EXCHANGE_BACKEND_ENV] = exchange_backend
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron_longgen.parallel.context_parallel import (
        COMM, ContextParallelAttention, exchange_plan, ring_bytes_sent, shard_batch_for_context_parallel)
    from megatron_longgen.parallel.cp.exchange import exchange_kernel
    from megatron.core.packed_seq_params import PackedSeqParams

    results = {}
    for layer, case in enumerate(CASES, start=1):
        q, k, v, w = case_tensors(case, seed=layer)
        ref = reference(case, q, k, v, w)
        packed = None
        if case.docs:
            cu = torch.tensor(case.docs, dtype=torch.int32)
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        # Shard [b, h, s, d] along s through the trainer's helper (it shards dim 1).
        full = {"q": q, "k": k, "v": v, "w": w, **{f"ref{i}": t for i, t in enumerate(ref)}}
        local, cp_packed = shard_batch_for_context_parallel(
            {n: t.transpose(1, 2) for n, t in full.items()}, packed, cp_size=world, cp_rank=rank)
        local = {n: t.transpose(1, 2) for n, t in local.items()}
        lq, lk, lv = (local[n].clone().requires_grad_() for n in ("q", "k", "v"))
        attn = ContextParallelAttention(case.pattern, torch.tensor(case.heads), case.kv_heads,
                                        case.head_dim ** -0.5, dist.group.WORLD, layer)
        COMM.reset()
        out = attn(lq, lk, lv, cp_packed)
        (out * local["w"]).sum().backward()
        res = {"out": _rel(out.detach(), local["ref0"]), "dq": _rel(lq.grad, local["ref1"]),
               "dk": _rel(lk.grad, local["ref2"]), "dv": _rel(lv.grad, local["ref3"]),
               "fwd_bytes": COMM.total(phase="fwd"), "bwd_bytes": COMM.total(phase="bwd"),
               "ring_bytes": ring_bytes_sent(SEQ, world, case.batch, len(case.kv_heads), case.head_dim, 4)}
        if not isinstance(case.pattern, CausalPattern):
            dplan = next(iter(attn._static.values()))["plan"]
            res["sink_window"] = exchange_kernel(dplan, lq, cp_packed and cp_packed.cu_seqlens_q) is not None
            plan = exchange_plan(case.pattern, SEQ, world, rank, case.kv_heads, case.docs)
            res["plan_bytes"] = plan.bytes_sent(case.batch, case.head_dim, 4)
            res["plan_bwd_bytes"] = plan.bytes_received(case.batch, case.head_dim, 4)
        results[case.name] = res
    with open(os.path.join(out_dir, f"layer_cp{world}{exchange_backend}_rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()
