"""Chunk pairs for the CP kernel tests (CPU interpreter and GPU): real ring pairs and the
sparse exchange's compact key layout from a real plan, on small sizes."""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_longgen.attention.patterns import AttnSinkPattern, BlockSparsePattern, CausalPattern
from megatron_longgen.parallel.cp.exchange import compact_keys
from megatron_longgen.parallel.cp.layout import local_positions
from megatron_longgen.parallel.cp.plan import exchange_plan

SEQ = 384
DOCS = (0, 40, 330, 384)  # a document across chunks 1..6 of CP 4, edges inside chunks
SINK = AttnSinkPattern(4, 40)


def block_sparse(num_heads, groups, homo=False):
    return BlockSparsePattern(block_size=16, local_blocks=2, vert_stride=3, homo_head=homo,
                              num_heads=num_heads, num_query_groups=groups)


@dataclass(frozen=True)
class Pair:
    name: str
    pattern: object
    q_pos: torch.Tensor
    k_pos: torch.Tensor  # [sk] or [hkv, sk]
    heads: Tuple[int, ...] = (0, 1, 2, 3)
    kv_heads: int = 2
    docs: Optional[Tuple[int, ...]] = None
    whole: bool = False  # the pair holds every key its queries read (exchange): final LSE = its own


def _chunk(i, c):
    return torch.arange(i * c, (i + 1) * c)


def _ring(name, q_chunk, k_chunk, docs=None):
    c = SEQ // 8  # CP 4: rank 1 holds chunks 1 and 6
    return Pair(name, CausalPattern(), _chunk(q_chunk, c), _chunk(k_chunk, c), docs=docs)


def _exchange(name, pattern, cp, rank, heads=(0, 1, 2, 3), kv_heads=(0, 1), docs=None):
    plan = exchange_plan(pattern, SEQ, cp, rank, kv_heads, docs)
    q_pos = local_positions(rank, cp, SEQ)
    _, key_pos = compact_keys(plan, q_pos)
    return Pair(name, pattern, q_pos, key_pos, heads, len(kv_heads), docs, whole=True)


PAIRS = [
    _ring("ring_diagonal", 6, 6),
    _ring("ring_off_diagonal", 6, 1),
    _ring("ring_diagonal_packed", 6, 6, DOCS),
    _ring("ring_off_diagonal_packed", 6, 1, DOCS),
    _exchange("exchange_sink_gqa", SINK, 4, 1),
    _exchange("exchange_sink_packed", SINK, 2, 1, docs=DOCS),
    _exchange("exchange_block_homo", block_sparse(4, 2, homo=True), 4, 2),
    # Heterogeneous heads: the second TP rank's 4 of 8 heads (KV groups 2, 3 of 4).
    _exchange("exchange_block_hetero_tp_slice", block_sparse(8, 4), 4, 2, heads=(4, 5, 6, 7), kv_heads=(2, 3)),
    _exchange("exchange_block_hetero_packed", block_sparse(4, 2), 2, 0, docs=DOCS),
]


def pair_tensors(pair: Pair, seed: int, head_dim: int = 16, device="cpu", dtype=torch.float32):
    """q, k, v, dout, and the LSE of other pairs' keys (their softmax mass), all random."""
    g = torch.Generator().manual_seed(seed)
    hq, sq, sk = len(pair.heads), len(pair.q_pos), pair.k_pos.shape[-1]
    shapes = ((1, hq, sq, head_dim), (1, pair.kv_heads, sk, head_dim), (1, pair.kv_heads, sk, head_dim),
              (1, hq, sq, head_dim), (1, hq, sq))
    return tuple(torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)


def pair_args(pair: Pair, head_dim: int = 16, device="cpu"):
    """attend's arguments after q, k, v."""
    cu = torch.tensor(pair.docs, device=device) if pair.docs else None
    return (pair.q_pos.to(device), pair.k_pos.to(device), pair.pattern, torch.tensor(pair.heads),
            head_dim ** -0.5, cu)
