"""Static communication plans, computed once on the CPU from the patterns module.

* ``needed_keys``: exactly which key positions any query of a set may read, per KV head.
  Closed forms per pattern on document-relative positions (checked against ``token_mask`` in
  the tests), so a 128K plan costs milliseconds rather than an L x L mask.
* ``ExchangePlan``: for a sparse layer, which K/V tokens one rank sends to and receives from
  every other rank (per KV head: heterogeneous BlockSparse heads read different vertical
  blocks). Built per rank by interval arithmetic, so 1M tokens at CP 64 take about a second.
* ``ring_pairs``: for a full layer, which (query chunk, key chunk) pairs of a ring step are
  not fully masked.
"""

from __future__ import annotations

import bisect
import functools
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
from megatron_longgen.parallel.cp.layout import check_seq_len, chunk_ids, owner_and_index


# ---------------------------------------------------------------- interval arithmetic

def _runs(lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For consecutive runs of ``lengths``: each element's run and its offset within the run."""
    end = lengths.cumsum(0)
    # searchsorted, not repeat_interleave: the latter costs milliseconds per call on CPU.
    run = torch.searchsorted(end, torch.arange(int(end[-1]) if len(end) else 0), right=True)
    return run, torch.arange(len(run)) - (end - lengths)[run]


def _expand(start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """``cat([arange(start[i], start[i] + length[i]) for i])`` without a Python loop."""
    run, offset = _runs(length)
    return start[run] + offset


def _merge(lo: torch.Tensor, hi: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted disjoint union of the intervals [lo, hi) (empty ones dropped)."""
    keep = hi > lo
    lo, order = lo[keep].sort()
    hi = hi[keep][order]
    if not len(lo):
        return lo, hi
    # An interval starts a new run when it begins after every earlier one ended.
    reach = hi.cummax(0).values
    start = torch.ones_like(lo, dtype=torch.bool)
    start[1:] = lo[1:] > reach[:-1]
    run = start.cumsum(0) - 1
    merged_hi = torch.zeros(int(run[-1]) + 1, dtype=torch.long).scatter_reduce_(0, run, hi, "amax")
    return lo[start], merged_hi


def _chunk_pieces(lo: torch.Tensor, hi: torch.Tensor, chunk_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cut sorted disjoint intervals at the CP chunk boundaries, so each piece has one owner."""
    first, last = lo // chunk_len, (hi - 1) // chunk_len
    run, offset = _runs(last - first + 1)
    chunk = first[run] + offset
    return torch.maximum(lo[run], chunk * chunk_len), torch.minimum(hi[run], (chunk + 1) * chunk_len)


# ---------------------------------------------------------------- keys a query range reads

def _range_intervals(pattern: Pattern, a: int, b: int, head: int, k0: int, k1: int):
    """Key intervals read by queries [a, b), clipped to keys [k0, k1) (document-relative,
    a < b, k1 <= b); may be unsorted, overlapping or empty."""
    if isinstance(pattern, CausalPattern):
        lo, hi = torch.tensor([0]), torch.tensor([b])
    elif isinstance(pattern, AttnSinkPattern):
        lo = torch.tensor([0, max(0, a - pattern.window_size + 1)])
        hi = torch.tensor([min(pattern.sink_tokens, b), b])
    elif isinstance(pattern, BlockSparsePattern):
        bs, first, last = pattern.block_size, a // pattern.block_size, (b - 1) // pattern.block_size
        # Vertical blocks: whole blocks before the last query block, only those inside [k0, k1).
        kb = torch.arange(k0 // bs, min(last, -(-k1 // bs)))
        kb = kb[pattern.vertical(kb, pattern.head_offsets([head]))]
        # Local blocks of the first query block up to the last query itself: one interval.
        lo = torch.cat([torch.tensor([max(0, first - pattern.local_blocks + 1) * bs]), kb * bs])
        hi = torch.cat([torch.tensor([b]), (kb + 1) * bs])
    else:
        raise TypeError(f"no context-parallel plan for pattern {pattern!r}")
    return lo.clamp(min=k0), hi.clamp(max=k1)


def needed_intervals(pattern: Pattern, seq_len: int, query_ranges: Sequence[Tuple[int, int]],
                     head: int = 0, cu_seqlens: Optional[Sequence[int]] = None,
                     key_ranges: Optional[Sequence[Tuple[int, int]]] = None):
    """Sorted disjoint key intervals (lo, hi) that some query in ``query_ranges`` (global,
    [lo, hi)) may read under ``pattern`` for global query ``head``, documents respected;
    only keys inside ``key_ranges`` (global, [lo, hi); all keys if None)."""
    docs = list(cu_seqlens) if cu_seqlens is not None else [0, seq_len]
    keys = key_ranges if key_ranges is not None else [(0, seq_len)]
    los, his = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for q0, q1 in query_ranges:
        # Only the documents the range overlaps; causality keeps keys inside the document.
        for d in range(max(0, bisect.bisect_right(docs, q0) - 1), len(docs) - 1):
            d0, d1 = docs[d], docs[d + 1]
            if d0 >= q1:
                break
            a, b = max(q0, d0), min(q1, d1)
            for k0, k1 in keys:
                k0, k1 = max(k0, d0), min(k1, b)
                if a < b and k0 < k1:
                    lo, hi = _range_intervals(pattern, a - d0, b - d0, head, k0 - d0, k1 - d0)
                    los.append(lo + d0)
                    his.append(hi + d0)
    return _merge(torch.cat(los), torch.cat(his))


def _fill(seq_len: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Boolean [L] mask of sorted disjoint intervals."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    mask[_expand(lo, hi - lo)] = True
    return mask


def needed_keys(pattern: Pattern, seq_len: int, query_ranges: Sequence[Tuple[int, int]], head: int = 0,
                cu_seqlens: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Boolean [L] form of ``needed_intervals`` (tests and small layouts)."""
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


def _pattern_classes(pattern: Pattern, kv_heads: Sequence[int]) -> Tuple[List[int], List[int]]:
    """Heads that read the same keys share one computation: a representative global query head
    per class, and each KV head's class (BlockSparse heads differ only by vertical offset)."""
    heads = representative_heads(pattern, kv_heads)
    if isinstance(pattern, BlockSparsePattern) and pattern.head_dependent:
        keys = pattern.head_offsets(heads).tolist()
    else:
        keys = [0] * len(heads)
    first = {}
    for key, head in zip(keys, heads):
        first.setdefault(key, head)
    classes = list(first)
    return list(first.values()), [classes.index(k) for k in keys]


# ---------------------------------------------------------------- sparse-layer exchange plan

@dataclass(frozen=True)
class ExchangePlan:
    """K/V rows one rank (``cp_rank``) sends to and receives from every other rank, for one
    sparse layer.

    Rows are (local KV head, token); the buffer from ``s`` to ``d`` lists s's rows head-major,
    positions ascending, and both ends derive the same list. ``send_index`` (to rank 0 first,
    ``send_splits[d]`` rows for rank d) are flat indices ``h * 2c + local_index`` into this
    rank's [hkv * 2c] K/V rows; ``recv_slot`` (from rank 0 first, ``recv_splits[s]`` rows from
    rank s) places each received row at ``h * E + e`` of this rank's extra-key table, whose
    column ``e`` holds global position ``extra_pos[e]`` (union over heads and sources).
    """

    cp_size: int
    cp_rank: int
    seq_len: int
    num_kv_heads: int
    send_index: torch.Tensor
    send_splits: Tuple[int, ...]
    recv_slot: torch.Tensor
    recv_splits: Tuple[int, ...]
    extra_pos: torch.Tensor

    def bytes_sent(self, batch: int, head_dim: int, element_size: int) -> int:
        """Forward bytes this rank sends (K and V rows)."""
        return sum(self.send_splits) * batch * 2 * head_dim * element_size

    def bytes_received(self, batch: int, head_dim: int, element_size: int) -> int:
        """Forward bytes this rank receives: what it sends back as dK/dV in the backward."""
        return sum(self.recv_splits) * batch * 2 * head_dim * element_size


def _receive(pattern, seq_len, cp_size, cp_rank, reps, cls, cu):
    """Slots of the rows ``cp_rank`` receives (per source, head-major, positions ascending),
    rows per source, and the extra-key table's positions."""
    c = seq_len // (2 * cp_size)
    los, his, owners = [], [], []
    for head in reps:  # the keys this rank's queries read, cut per owner, its own left out
        lo, hi = _chunk_pieces(*needed_intervals(pattern, seq_len, query_ranges(cp_rank, cp_size, seq_len),
                                                 head, cu), c)
        owner, _ = owner_and_index(lo, cp_size, seq_len)
        other = owner != cp_rank
        los.append(lo[other]), his.append(hi[other]), owners.append(owner[other])
    columns_lo, columns_hi = _merge(torch.cat(los), torch.cat(his))
    extra_pos = _expand(columns_lo, columns_hi - columns_lo)
    width = len(extra_pos)
    # Column of each piece's first key: pieces lie inside one merged interval.
    first_column = torch.cumsum(columns_hi - columns_lo, 0) - (columns_hi - columns_lo)
    n = torch.tensor([len(p) for p in los])
    lo, hi, owner = torch.cat(los), torch.cat(his), torch.cat(owners)
    at = torch.searchsorted(columns_lo, lo, right=True) - 1
    column = first_column[at] + lo - columns_lo[at]
    # Each KV head takes its class's pieces; order by (source, KV head, position).
    classes = torch.tensor(cls, dtype=torch.long)
    take = _expand((n.cumsum(0) - n)[classes], n[classes])
    kv = _runs(n[classes])[0]
    lo, length, owner, column = lo[take], (hi - lo)[take], owner[take], column[take]
    order = torch.argsort((owner * len(cls) + kv) * seq_len + lo)
    slots = _expand(kv[order] * width + column[order], length[order])
    rows = torch.zeros(cp_size, dtype=torch.long).index_add_(0, owner, length)
    return slots, tuple(rows.tolist()), extra_pos


def _send(pattern, seq_len, cp_size, cp_rank, reps, cls, cu):
    """Indices of the rows ``cp_rank`` sends (per destination, head-major, positions
    ascending) and rows per destination: each destination's needs inside this rank's chunks."""
    c = seq_len // (2 * cp_size)
    mine = query_ranges(cp_rank, cp_size, seq_len)
    starts, lengths, rows = [], [], [0] * cp_size
    for dst in range(cp_size):
        if dst == cp_rank:
            continue
        per_class = []
        for head in reps:
            lo, hi = _chunk_pieces(*needed_intervals(pattern, seq_len, query_ranges(dst, cp_size, seq_len),
                                                     head, cu, key_ranges=mine), c)
            per_class.append((owner_and_index(lo, cp_size, seq_len)[1], hi - lo))
        for h, k in enumerate(cls):
            index, length = per_class[k]
            starts.append(h * 2 * c + index)
            lengths.append(length)
            rows[dst] += int(length.sum())
    if not starts:
        return torch.zeros(0, dtype=torch.long), tuple(rows)
    return _expand(torch.cat(starts), torch.cat(lengths)), tuple(rows)


@functools.lru_cache(maxsize=64)
def exchange_plan(pattern: Pattern, seq_len: int, cp_size: int, cp_rank: int, kv_heads: Tuple[int, ...],
                  cu_seqlens: Optional[Tuple[int, ...]] = None) -> ExchangePlan:
    """Rank ``cp_rank``'s plan for global KV heads ``kv_heads`` (this TP rank's), cached per
    layout. Interval arithmetic on the rank's own needs and on each destination's needs inside
    its chunks: O(CP x head classes x intervals), no [L] tensors but the moved rows' indices."""
    check_seq_len(seq_len, cp_size)
    reps, cls = _pattern_classes(pattern, kv_heads)
    send_index, send_splits = _send(pattern, seq_len, cp_size, cp_rank, reps, cls, cu_seqlens)
    recv_slot, recv_splits, extra_pos = _receive(pattern, seq_len, cp_size, cp_rank, reps, cls, cu_seqlens)
    return ExchangePlan(cp_size, cp_rank, seq_len, len(kv_heads), send_index, send_splits,
                        recv_slot, recv_splits, extra_pos)


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
    """Forward bytes each rank sends in the pattern-aware exchange (all KV heads, one TP rank):
    each rank's needs cut per owner, as ``exchange_plan`` counts them, one head class at a time."""
    c = check_seq_len(seq_len, cp_size)
    reps, cls = _pattern_classes(pattern, list(range(kv_heads)))
    rows = torch.zeros(cp_size, dtype=torch.long)
    for dst in range(cp_size):
        for k, head in enumerate(reps):
            lo, hi = _chunk_pieces(*needed_intervals(pattern, seq_len, query_ranges(dst, cp_size, seq_len), head), c)
            owner, _ = owner_and_index(lo, cp_size, seq_len)
            other = owner != dst  # its own tokens stay
            rows.index_add_(0, owner[other], (hi - lo)[other] * cls.count(k))
    return [int(n) * batch * 2 * head_dim * element_size for n in rows]
