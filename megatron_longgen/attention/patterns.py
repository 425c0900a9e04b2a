"""LongGen attention patterns: the single source of truth.

Every consumer (the reference attention, the GPU kernels, context parallelism, the KV cache)
asks a pattern the same two questions:

* ``allowed(q_pos, k_pos, head)``: may query ``q_pos`` read key ``k_pos``? Token level, causal,
  positions counted from the start of the query's document.
* ``tile_states(...)``: for a tile of query positions x key positions, are its pairs all
  masked (EMPTY), all allowed (FULL) or mixed (PARTIAL)? Kernels skip EMPTY tiles and apply
  ``allowed`` element-wise only inside PARTIAL ones.

Heads: a pattern may differ per *global* query head (BlockSparse with ``homo_head=False``).
Query heads of one GQA group always share their pattern, so each KV head has one pattern too
and a KV cache can drop per KV head what none of its query heads reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

EMPTY, PARTIAL, FULL = 0, 1, 2

Heads = Union[torch.Tensor, Sequence[int], None]


def _as_tensor(x, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.long) if device is not None else x.long()
    return torch.as_tensor(x, dtype=torch.long, device=device)


def _tile_state(any_allowed: torch.Tensor, all_allowed: torch.Tensor) -> torch.Tensor:
    state = torch.where(any_allowed, PARTIAL, EMPTY)
    return torch.where(all_allowed & any_allowed, FULL, state).to(torch.int8)


@dataclass(frozen=True)
class CausalPattern:
    """Full causal attention: the pattern of the full-attention layers."""

    name = "causal"
    head_dependent = False

    def allowed(self, q_pos, k_pos, head=None) -> torch.Tensor:
        return _as_tensor(k_pos) <= _as_tensor(q_pos)

    def tile_states(self, q_lo, q_hi, k_lo, k_hi, head=None) -> torch.Tensor:
        """States of tiles [q_lo, q_hi) x [k_lo, k_hi) (broadcasting tensors)."""
        q_lo, q_hi, k_lo, k_hi = map(_as_tensor, (q_lo, q_hi, k_lo, k_hi))
        return _tile_state(k_lo <= q_hi - 1, k_hi - 1 <= q_lo)

    def allowed_keys_per_query(self, q_pos: torch.Tensor, head: int = 0) -> torch.Tensor:
        return _as_tensor(q_pos) + 1


@dataclass(frozen=True)
class AttnSinkPattern:
    """The first ``sink_tokens`` tokens plus a sliding window of the last ``window_size`` tokens
    (the query itself included: ``q - k < window_size``)."""

    sink_tokens: int
    window_size: int

    name = "attn_sink"
    head_dependent = False

    def allowed(self, q_pos, k_pos, head=None) -> torch.Tensor:
        q, k = _as_tensor(q_pos), _as_tensor(k_pos)
        return (k <= q) & ((k < self.sink_tokens) | (q - k < self.window_size))

    def tile_states(self, q_lo, q_hi, k_lo, k_hi, head=None) -> torch.Tensor:
        q_lo, q_hi, k_lo, k_hi = map(_as_tensor, (q_lo, q_hi, k_lo, k_hi))
        sink, window = self.sink_tokens, self.window_size
        causal_any = k_lo <= q_hi - 1
        # Closest causal pair is (q_lo, k_hi - 1) when it is causal, else distance 0.
        any_allowed = causal_any & ((k_lo < sink) | (q_lo - (k_hi - 1) < window))
        # Every pair causal, and every non-sink key within the window of the farthest query.
        first_non_sink = torch.maximum(k_lo, torch.full_like(k_lo, sink))
        all_allowed = (k_hi - 1 <= q_lo) & ((k_hi <= sink) | (q_hi - 1 - first_non_sink < window))
        return _tile_state(any_allowed, all_allowed)

    def allowed_keys_per_query(self, q_pos: torch.Tensor, head: int = 0) -> torch.Tensor:
        visible = _as_tensor(q_pos) + 1
        in_window = visible.clamp(max=self.window_size)
        sinks_outside = (visible - self.window_size).clamp(min=0).clamp(max=self.sink_tokens)
        return in_window + sinks_outside


VERT_STRIDE_RULES = ("cover", "legacy")


@dataclass(frozen=True)
class BlockSparsePattern:
    """Blockwise: each query block reads its ``local_blocks`` most recent key blocks (itself
    included) plus vertical key blocks. Within a block, attention is causal.

    A head of vertical offset ``o`` reads key block ``kb`` as a vertical block when
    ``((kb + 1 + o) % vert_stride) % vert_period == 0``. With ``homo_head=True`` every head has
    offset 0 and period ``vert_stride``: every ``vert_stride``-th block. With ``homo_head=False``
    the offset and period follow the query group ``g`` of the head (the query heads of a GQA
    group share one pattern) by ``vert_stride_rule``:

    * ``cover``: offset ``g % vert_stride``, period ``min(num_query_groups, vert_stride)``. Each
      group reads ``ceil(vert_stride / num_query_groups)`` blocks in every ``vert_stride`` and
      the groups together read every block. With ``num_query_groups >= vert_stride`` this is
      exactly ``legacy``; with fewer groups each query reads that many times more vertical
      blocks (one query group: every block).
    * ``legacy`` (checkpoints trained before the rule was recorded): offset ``g * max(1,
      vert_stride // num_query_groups) % vert_stride``, period ``vert_stride``. With fewer
      groups than ``vert_stride`` some blocks are read by no head.
    """

    block_size: int
    local_blocks: int
    vert_stride: int
    homo_head: bool = False
    num_heads: int = 1
    num_query_groups: int = 1
    vert_stride_rule: str = "cover"

    name = "block_sparse"

    def __post_init__(self):
        if self.vert_stride_rule not in VERT_STRIDE_RULES:
            raise ValueError(f"vert_stride_rule must be one of {VERT_STRIDE_RULES}, "
                             f"got {self.vert_stride_rule!r}")

    @property
    def head_dependent(self) -> bool:
        return not self.homo_head and self.num_query_groups > 1 and self.vert_stride > 1

    @property
    def _covering(self) -> bool:
        return not self.homo_head and self.vert_stride_rule == "cover"

    @property
    def vert_period(self) -> int:
        """A head reads the blocks whose ``(kb + 1 + offset) % vert_stride`` is a multiple."""
        return min(self.num_query_groups, self.vert_stride) if self._covering else self.vert_stride

    def head_offsets(self, heads: Heads) -> torch.Tensor:
        """Vertical-stride offset of each global query head."""
        heads = _as_tensor(heads if heads is not None else range(self.num_heads))
        if self.homo_head:
            return torch.zeros_like(heads)
        group = heads // (self.num_heads // self.num_query_groups)
        step = 1 if self._covering else max(1, self.vert_stride // self.num_query_groups)
        return (group * step) % self.vert_stride

    def vertical(self, k_block, offset) -> torch.Tensor:
        """Whether key block ``k_block`` is a vertical block of a head with ``offset``."""
        kb, offset = _as_tensor(k_block), _as_tensor(offset)
        return (kb + 1 + offset) % self.vert_stride % self.vert_period == 0

    def vertical_index(self, k_block, offset) -> torch.Tensor:
        """How many vertical blocks of a head with ``offset`` come before ``k_block``: the
        rank of a vertical block among them (compact per-head storage)."""
        kb, offset = _as_tensor(k_block), _as_tensor(offset)
        stride, period = self.vert_stride, self.vert_period
        per_stride = -(-stride // period)

        def upto(n):  # vertical residues x in [0, n): (x % stride) % period == 0
            return n // stride * per_stride + (n % stride + period - 1) // period

        return upto(kb + 1 + offset) - upto(1 + offset)

    def block_allowed(self, q_block, k_block, head=None) -> torch.Tensor:
        qb, kb = _as_tensor(q_block), _as_tensor(k_block)
        vertical = self.vertical(kb, self.head_offsets(head if head is not None else 0))
        return (kb <= qb) & ((qb - kb < self.local_blocks) | vertical)

    def allowed(self, q_pos, k_pos, head=None) -> torch.Tensor:
        q, k = _as_tensor(q_pos), _as_tensor(k_pos)
        return (k <= q) & self.block_allowed(q // self.block_size, k // self.block_size, head)

    def tile_states(self, q_lo, q_hi, k_lo, k_hi, head=None) -> torch.Tensor:
        """Tiles must not straddle a sparse block unless they cover whole sparse blocks;
        ``block_layout`` builds such tiles. Here each tile lies inside one sparse block pair."""
        q_lo, q_hi, k_lo, k_hi = map(_as_tensor, (q_lo, q_hi, k_lo, k_hi))
        inside = self.block_allowed(q_lo // self.block_size, k_lo // self.block_size, head)
        causal = CausalPattern().tile_states(q_lo, q_hi, k_lo, k_hi)
        return torch.where(inside, causal, torch.zeros_like(causal))

    def allowed_keys_per_query(self, q_pos: torch.Tensor, head: int = 0) -> torch.Tensor:
        q = _as_tensor(q_pos)
        qb = q // self.block_size
        blocks = torch.arange(int(qb.max().item()) + 1 if q.numel() else 0)
        earlier = self.block_allowed(blocks[:, None], blocks[None, :], head)
        earlier &= blocks[None, :] < blocks[:, None]
        return earlier.sum(-1)[qb] * self.block_size + (q - qb * self.block_size + 1)


Pattern = Union[CausalPattern, AttnSinkPattern, BlockSparsePattern]


def pattern_heads(pattern: Pattern, heads: Heads, num_heads: int) -> torch.Tensor:
    """The head indices a layout needs: all heads if the pattern depends on the head, else [0]."""
    if not pattern.head_dependent:
        return torch.zeros(1, dtype=torch.long)
    return _as_tensor(heads if heads is not None else range(num_heads))


def token_mask(
    pattern: Pattern,
    seq_len: int,
    heads: Heads = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    num_heads: int = 1,
) -> torch.Tensor:
    """Boolean mask [H, L, L] (H = 1 when the pattern is the same for every head).

    ``cu_seqlens`` (cumulative document lengths starting at 0, ending at ``seq_len``) packs
    several documents into one sequence: no pair crosses a document, and positions restart at
    each document start, so every document has its own sink tokens and blocks.
    """
    heads_t = pattern_heads(pattern, heads, num_heads)
    pos = torch.arange(seq_len)
    doc = torch.zeros(seq_len, dtype=torch.long)
    if cu_seqlens is not None:
        cu = _as_tensor(cu_seqlens).cpu()
        if cu[0] != 0 or cu[-1] != seq_len or (cu[1:] < cu[:-1]).any():
            raise ValueError(f"cu_seqlens must rise from 0 to seq_len={seq_len}, got {cu.tolist()}")
        doc = torch.bucketize(pos, cu[1:], right=True)
        pos = pos - cu[doc]
    same_doc = doc[:, None] == doc[None, :]
    mask = pattern.allowed(pos[None, :, None], pos[None, None, :], heads_t[:, None, None])
    return mask & same_doc


def block_layout(
    pattern: Pattern,
    seq_len: int,
    block_q: int,
    block_k: int,
    heads: Heads = None,
    num_heads: int = 1,
) -> torch.Tensor:
    """Tile states int8 [H, ceil(L/block_q), ceil(L/block_k)] for self-attention over [0, L).

    H = 1 when the pattern is the same for every head. Tail tiles are judged on their valid
    part; kernels bound-check tail tiles regardless. For BlockSparse, tile sizes must be
    multiples or divisors of the sparse block size.
    """
    heads_t = pattern_heads(pattern, heads, num_heads)
    nq, nk = math.ceil(seq_len / block_q), math.ceil(seq_len / block_k)
    if isinstance(pattern, BlockSparsePattern):
        b = pattern.block_size
        for t in (block_q, block_k):
            if t % b and b % t:
                raise ValueError(f"tile size {t} must be a multiple or divisor of block {b}")
        # Judge units that never straddle a sparse block, then pool them into tiles.
        unit = math.gcd(math.gcd(block_q, block_k), b)
        fine = _contiguous_states(pattern, seq_len, unit, unit, heads_t)
        return _pool_states(fine, block_q // unit, block_k // unit, nq, nk)
    return _contiguous_states(pattern, seq_len, block_q, block_k, heads_t)


def _contiguous_states(pattern, seq_len, block_q, block_k, heads_t) -> torch.Tensor:
    q_lo = torch.arange(0, seq_len, block_q)
    k_lo = torch.arange(0, seq_len, block_k)
    q_hi = (q_lo + block_q).clamp(max=seq_len)
    k_hi = (k_lo + block_k).clamp(max=seq_len)
    return pattern.tile_states(
        q_lo[None, :, None], q_hi[None, :, None], k_lo[None, None, :], k_hi[None, None, :],
        heads_t[:, None, None],
    )


def _pool_states(fine: torch.Tensor, fq: int, fk: int, nq: int, nk: int) -> torch.Tensor:
    h, mq, mk = fine.shape

    def tiles(pad_value):  # units past the sequence end must not sway the verdict
        padded = torch.full((h, nq * fq, nk * fk), pad_value, dtype=torch.int8)
        padded[:, :mq, :mk] = fine
        return padded.view(h, nq, fq, nk, fk)

    any_allowed = tiles(EMPTY).amax(dim=(2, 4)) > EMPTY
    all_allowed = tiles(FULL).amin(dim=(2, 4)) == FULL
    return _tile_state(any_allowed, all_allowed)


def allowed_pair_count(pattern: Pattern, seq_len: int, heads: Heads = None, num_heads: int = 1) -> int:
    """Number of (query, key) pairs the pattern allows over [0, L), summed over ``heads``."""
    q = torch.arange(seq_len)
    if not pattern.head_dependent:
        n_heads = len(_as_tensor(heads)) if heads is not None else num_heads
        return int(pattern.allowed_keys_per_query(q).sum()) * n_heads
    heads_t = _as_tensor(heads if heads is not None else range(num_heads))
    return sum(int(pattern.allowed_keys_per_query(q, int(h)).sum()) for h in heads_t)
