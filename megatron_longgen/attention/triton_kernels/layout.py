"""Compact tile lists for the block-sparse kernels, built from ``patterns.block_layout``.

A kernel program owns one query tile (or one key tile in the dK/dV pass) and walks only the
tiles its row (column) of the layout marks non-EMPTY. A row lists the tiles that need no mask
(FULL tiles inside the sequence) first, then those that do; ``counts`` holds both numbers, so
the kernels run the unmasked tiles in a loop of their own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_longgen.attention.patterns import (
    EMPTY,
    FULL,
    PARTIAL,
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    Pattern,
    block_layout,
    pattern_heads,
)

# Pattern ids shared with the kernels' element mask.
CAUSAL, SINK, BLOCK_SPARSE = 0, 1, 2


def pattern_params(pattern: Pattern) -> Tuple[int, int, int, int, int]:
    """(kernel pattern id, p0, p1, p2, p3) for the element mask."""
    if isinstance(pattern, CausalPattern):
        return CAUSAL, 0, 0, 1, 1
    if isinstance(pattern, AttnSinkPattern):
        return SINK, pattern.sink_tokens, pattern.window_size, 1, 1
    if isinstance(pattern, BlockSparsePattern):
        return (BLOCK_SPARSE, pattern.block_size, pattern.local_blocks, pattern.vert_stride,
                pattern.vert_period)
    raise TypeError(f"unsupported pattern {pattern!r}")


@dataclass(frozen=True)
class TileLists:
    entries: torch.Tensor  # int32 [H', rows, max_count]: tile indices, unmasked ones first
    counts: torch.Tensor  # int32 [H', rows, 2]: (unmasked tiles, all tiles)
    per_head: bool  # H' is the number of local heads (else 1, shared by all heads)


def documents_layout(pattern: Pattern, seq_len: int, block_q: int, block_k: int,
                     heads: torch.Tensor, cu_seqlens: Tuple[int, ...]) -> torch.Tensor:
    """Tile states of packed documents: the union of each document's own layout.

    Document starts need not align with tiles, so each document is judged on fine units in
    its own coordinates and every unit is mapped to the (at most two) tiles it overlaps.
    Every such tile is PARTIAL: the kernels' element mask (document ids, relative positions)
    decides the pairs, so correctness never depends on a FULL verdict across documents.
    """
    unit = math.gcd(block_q, block_k)
    if isinstance(pattern, BlockSparsePattern):
        unit = math.gcd(unit, pattern.block_size)
    heads_t = pattern_heads(pattern, heads, len(heads))
    nq, nk = math.ceil(seq_len / block_q), math.ceil(seq_len / block_k)
    states = torch.zeros(len(heads_t), nq, nk, dtype=torch.int8)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end == start:
            continue
        fine = block_layout(pattern, end - start, unit, unit, heads, len(heads))
        h, i, j = (fine != EMPTY).nonzero(as_tuple=True)
        lo_i, lo_j = start + i * unit, start + j * unit
        hi_i, hi_j = (lo_i + unit).clamp(max=end) - 1, (lo_j + unit).clamp(max=end) - 1
        for qi in (lo_i // block_q, hi_i // block_q):
            for kj in (lo_j // block_k, hi_j // block_k):
                states[h, qi, kj] = PARTIAL
    return states


def _compact(states: torch.Tensor, seq_len: int, block_q: int, block_k: int,
             transpose: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    # A tile reaching past the sequence end is masked whatever its state: the padding
    # rows/columns are loaded as zeros and must not count in the softmax.
    q_tail = (torch.arange(states.shape[1]) + 1) * block_q > seq_len
    k_tail = (torch.arange(states.shape[2]) + 1) * block_k > seq_len
    needs_mask = (states != FULL) | q_tail[None, :, None] | k_tail[None, None, :]
    if transpose:
        states, needs_mask = states.transpose(1, 2), needs_mask.transpose(1, 2)
    nonempty = states != EMPTY
    unmasked = nonempty & ~needs_mask
    counts = torch.stack([unmasked.sum(-1), nonempty.sum(-1)], -1)
    width = max(int(counts[..., 1].max()), 1)
    # Rank 0: unmasked, 1: masked, 2: empty; a stable sort keeps ascending tile order in each.
    rank = torch.where(unmasked, 0, torch.where(nonempty, 1, 2)).to(torch.int8)
    entries = torch.sort(rank, dim=-1, stable=True).indices[..., :width]
    return entries.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


@functools.lru_cache(maxsize=64)
def _cached_lists(pattern, seq_len, heads, cu_seqlens, block_q, block_k, transpose, device):
    heads_t = torch.tensor(heads, dtype=torch.long)
    if cu_seqlens is None:
        states = block_layout(pattern, seq_len, block_q, block_k, heads_t, len(heads))
    else:
        states = documents_layout(pattern, seq_len, block_q, block_k, heads_t, cu_seqlens)
    entries, counts = _compact(states, seq_len, block_q, block_k, transpose)
    return TileLists(entries.to(device), counts.to(device), per_head=states.shape[0] > 1)


def tile_lists(pattern: Pattern, seq_len: int, heads: torch.Tensor,
               cu_seqlens: Optional[Tuple[int, ...]], block_q: int, block_k: int,
               transpose: bool, device: torch.device) -> TileLists:
    """Per query tile (``transpose=False``) the key tiles to read, or per key tile the query
    tiles that read it; cached per (pattern, length, heads, documents, tiles)."""
    heads = tuple(int(h) for h in heads.tolist())
    return _cached_lists(pattern, seq_len, heads, cu_seqlens, block_q, block_k, transpose,
                         torch.device(device))
