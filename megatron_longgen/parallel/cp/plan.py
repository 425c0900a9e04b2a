"""Static communication plans, computed once on the CPU from the patterns module.

* ``needed_keys``: exactly which key positions any query of a set may read, per KV head.
  Closed forms per pattern on document-relative positions (checked against ``token_mask`` in
  the tests), so a 128K plan costs milliseconds rather than an L x L mask.
* ``ExchangePlan``: for a sparse layer, which K/V tokens every rank sends every other rank
  (per KV head: heterogeneous BlockSparse heads read different vertical blocks).
* ``ring_pairs``: for a full layer, which (query chunk, key chunk) pairs of a ring step are
  not fully masked.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_longgen.attention.patterns import (
    EMPTY,
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    Pattern,
)
from megatron_longgen.parallel.cp.layout import check_seq_len, chunk_ids, local_positions, owner_and_index


# ---------------------------------------------------------------- keys a query range reads

def _range_intervals(pattern: Pattern, a: int, b: int, head: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key intervals [lo, hi) read by queries [a, b) (document-relative, a < b)."""
    if isinstance(pattern, CausalPattern):
        return torch.tensor([0]), torch.tensor([b])
    if isinstance(pattern, AttnSinkPattern):
        return (torch.tensor([0, max(0, a - pattern.window_size + 1)]),
                torch.tensor([min(pattern.sink_tokens, b), b]))
    if isinstance(pattern, BlockSparsePattern):
        bs, first, last = pattern.block_size, a // pattern.block_size, (b - 1) // pattern.block_size
        # Local blocks of the first query block up to the last query itself: one interval.
        lo, hi = [max(0, first - pattern.local_blocks + 1) * bs], [b]
        # Vertical blocks: whole blocks before the last query block (earlier ones are whole too).
        kb = torch.arange(last)
        kb = kb[pattern.vertical(kb, pattern.head_offsets([head]))]
        return torch.cat([torch.tensor(lo), kb * bs]), torch.cat([torch.tensor(hi), (kb + 1) * bs])
    raise TypeError(f"no context-parallel plan for pattern {pattern!r}")


def _fill(seq_len: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Boolean [L] mask of the union of intervals (difference array, no Python loop)."""
    keep = hi > lo
    diff = torch.zeros(seq_len + 1, dtype=torch.long)
    diff.index_add_(0, lo[keep], torch.ones_like(lo[keep]))
    diff.index_add_(0, hi[keep], -torch.ones_like(hi[keep]))
    return diff.cumsum(0)[:seq_len] > 0


def needed_intervals(pattern: Pattern, seq_len: int, query_ranges: Sequence[Tuple[int, int]],
                     head: int = 0, cu_seqlens: Optional[Sequence[int]] = None):
    """Sorted disjoint key intervals (lo, hi) that some query in ``query_ranges`` (global,
    [lo, hi)) may read under ``pattern`` for global query ``head``, documents respected."""
    docs = list(cu_seqlens) if cu_seqlens is not None else [0, seq_len]
    los, his = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for d in range(len(docs) - 1):
        d0, d1 = docs[d], docs[d + 1]
        for q0, q1 in query_ranges:
            a, b = max(q0, d0), min(q1, d1)
            if a < b:  # intervals are document-relative; causality keeps them inside the document
                lo, hi = _range_intervals(pattern, a - d0, b - d0, head)
                los.append(lo + d0)
                his.append(hi + d0)
    lo, hi = torch.cat(los), torch.cat(his)
    keep = hi > lo
    lo, order = lo[keep].sort()
    hi = hi[keep][order]
    if not len(lo):
        return lo, hi
    # Merge: an interval starts a new run when it begins after every earlier one ended.
    reach = hi.cummax(0).values
    start = torch.ones_like(lo, dtype=torch.bool)
    start[1:] = lo[1:] > reach[:-1]
    run = start.cumsum(0) - 1
    n = int(run[-1]) + 1
    merged_hi = torch.zeros(n, dtype=torch.long).scatter_reduce_(0, run, hi, "amax")
    return lo[start], merged_hi


def needed_keys(pattern: Pattern, seq_len: int, query_ranges: Sequence[Tuple[int, int]], head: int = 0,
                cu_seqlens: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Boolean [L] form of ``needed_intervals``."""
    return _fill(seq_len, *needed_intervals(pattern, seq_len, query_ranges, head, cu_seqlens))


def query_ranges(cp_rank: int, cp_size: int, seq_len: int) -> List[Tuple[int, int]]:
    c = check_seq_len(seq_len, cp_size)
    return [(i * c, (i + 1) * c) for i in chunk_ids(cp_rank, cp_size)]


def representative_heads(pattern: Pattern, kv_heads: Sequence[int]) -> List[int]:
    """A global query head per KV head: query heads of one GQA group share their pattern."""
    if not pattern.head_dependent:
        return [0] * len(kv_heads)
    group = pattern.num_heads // pattern.num_query_groups
    return [g * group for g in kv_heads]


# ---------------------------------------------------------------- sparse-layer exchange plan

@dataclass(frozen=True)
class ExchangePlan:
    """K/V rows every rank sends every other rank for one sparse layer.

    Rows are (local KV head, token); a rank's send buffer to ``dst`` lists its rows head-major,
    positions ascending, and the receiver knows the same list. ``send_index[s][d]`` are flat
    indices ``h * 2c + local_index`` into s's [hkv * 2c] K/V rows; ``recv_slot[d][s]`` places
    each received row at ``h * E + e`` of d's extra-key table, whose column ``e`` holds global
    position ``extra_pos[d][e]`` (union over heads and sources).
    """

    cp_size: int
    seq_len: int
    num_kv_heads: int
    send_index: Tuple[Tuple[torch.Tensor, ...], ...]
    recv_slot: Tuple[Tuple[torch.Tensor, ...], ...]
    extra_pos: Tuple[torch.Tensor, ...]

    def rows(self, src: int, dst: int) -> int:
        return len(self.send_index[src][dst])

    def send_splits(self, rank: int) -> List[int]:
        return [self.rows(rank, d) for d in range(self.cp_size)]

    def recv_splits(self, rank: int) -> List[int]:
        return [self.rows(s, rank) for s in range(self.cp_size)]

    def bytes_sent(self, rank: int, batch: int, head_dim: int, element_size: int) -> int:
        """Forward bytes ``rank`` sends (K and V rows)."""
        return sum(self.send_splits(rank)) * batch * 2 * head_dim * element_size

    def bytes_received(self, rank: int, batch: int, head_dim: int, element_size: int) -> int:
        """Forward bytes ``rank`` receives: what it sends back as dK/dV in the backward."""
        return sum(self.recv_splits(rank)) * batch * 2 * head_dim * element_size


def _needs_per_rank(pattern, seq_len, cp_size, heads, cu) -> torch.Tensor:
    """Boolean [CP, heads, L]: keys each rank needs per head, its own tokens excluded."""
    out = torch.zeros(cp_size, len(heads), seq_len, dtype=torch.bool)
    owner, _ = owner_and_index(torch.arange(seq_len), cp_size, seq_len)
    cache = {}
    for r in range(cp_size):
        for i, h in enumerate(heads):
            if h not in cache:  # heads with the same pattern share their needs
                cache[h] = needed_keys(pattern, seq_len, query_ranges(r, cp_size, seq_len), h, cu)
            out[r, i] = cache[h] & (owner != r)
        cache.clear()
    return out


@functools.lru_cache(maxsize=64)
def exchange_plan(pattern: Pattern, seq_len: int, cp_size: int, kv_heads: Tuple[int, ...],
                  cu_seqlens: Optional[Tuple[int, ...]] = None) -> ExchangePlan:
    """The plan for global KV heads ``kv_heads`` (this TP rank's), cached per layout."""
    c2 = 2 * check_seq_len(seq_len, cp_size)
    heads = representative_heads(pattern, kv_heads)
    needs = _needs_per_rank(pattern, seq_len, cp_size, heads, cu_seqlens)
    owner, index = owner_and_index(torch.arange(seq_len), cp_size, seq_len)
    hkv = len(kv_heads)
    send = [[torch.zeros(0, dtype=torch.long) for _ in range(cp_size)] for _ in range(cp_size)]
    slots = [[torch.zeros(0, dtype=torch.long) for _ in range(cp_size)] for _ in range(cp_size)]
    extras = []
    for d in range(cp_size):
        extra = needs[d].any(0).nonzero().flatten()  # columns of d's extra-key table
        extras.append(extra)
        column = torch.full((seq_len,), -1, dtype=torch.long)
        column[extra] = torch.arange(len(extra))
        for s in range(cp_size):
            if s == d:
                continue
            h, pos = (needs[d] & (owner == s)).nonzero(as_tuple=True)  # head-major, pos ascending
            send[s][d] = h * c2 + index[pos]
            slots[d][s] = h * len(extra) + column[pos]
    return ExchangePlan(cp_size, seq_len, hkv, tuple(map(tuple, send)), tuple(map(tuple, slots)),
                        tuple(extras))


# ---------------------------------------------------------------- full-layer ring schedule

@functools.lru_cache(maxsize=64)
def ring_pairs(cp_rank: int, cp_size: int, seq_len: int, step: int) -> Tuple[Tuple[int, int, bool], ...]:
    """At ring step ``step`` rank r holds the K/V of rank (r - step) % CP. Returns the
    (local query chunk, remote key chunk, needs_mask) triples that are not fully masked;
    chunks are 0 (early) or 1 (late). Causal only: documents may mask more, never less."""
    c = check_seq_len(seq_len, cp_size)
    src = (cp_rank - step) % cp_size
    out = []
    for qi, qc in enumerate(chunk_ids(cp_rank, cp_size)):
        for ki, kc in enumerate(chunk_ids(src, cp_size)):
            state = int(CausalPattern().tile_states(qc * c, (qc + 1) * c, kc * c, (kc + 1) * c))
            if state != EMPTY:
                out.append((qi, ki, state != 2))
    return tuple(out)


# ---------------------------------------------------------------- byte calculator

def ring_bytes_sent(seq_len: int, cp_size: int, batch: int, kv_heads: int, head_dim: int,
                    element_size: int) -> int:
    """Forward bytes a rank sends in ring attention: its K/V block, CP - 1 hops. TE's
    all-gather CP sends the same (each rank's K/V reaches the CP - 1 others)."""
    return (cp_size - 1) * 2 * batch * kv_heads * (seq_len // cp_size) * head_dim * element_size


def exchange_bytes_sent(pattern: Pattern, seq_len: int, cp_size: int, batch: int, kv_heads: int,
                        head_dim: int, element_size: int) -> List[int]:
    """Forward bytes each rank sends in the pattern-aware exchange (all KV heads, one TP rank).

    Interval arithmetic, no [L] masks: a 128K plan for CP 32 takes well under a second. KV
    heads with the same pattern are counted once and weighted.
    """
    c = check_seq_len(seq_len, cp_size)
    heads = representative_heads(pattern, list(range(kv_heads)))
    chunk_lo = torch.arange(2 * cp_size) * c
    chunk_owner = torch.cat([torch.arange(cp_size), torch.arange(cp_size - 1, -1, -1)])
    rows = torch.zeros(cp_size, dtype=torch.long)
    for dst in range(cp_size):
        ranges = query_ranges(dst, cp_size, seq_len)
        for h in sorted(set(heads)):
            lo, hi = needed_intervals(pattern, seq_len, ranges, h)
            overlap = (torch.minimum(hi[:, None], chunk_lo + c) - torch.maximum(lo[:, None], chunk_lo)).clamp(min=0)
            per_chunk = overlap.sum(0) * heads.count(h)
            per_chunk[chunk_owner == dst] = 0  # its own tokens
            rows.index_add_(0, chunk_owner, per_chunk)
    return [int(n) * batch * 2 * head_dim * element_size for n in rows]
