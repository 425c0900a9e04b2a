"""KV cache per layer kind, sized up front from the attention patterns.

A layer's cache holds, per sequence and per KV head, a fixed number of *slots*. Each slot
stores one token's K and V and the token's global position (-1 = empty). Which tokens a slot
may hold follows from the layer's pattern (``megatron_longgen.attention.patterns``):

* full (causal) layers keep every token: slot = position;
* AttnSink layers keep the sink tokens plus a ring of the last ``window_size - 1`` tokens (the
  next query reads itself from the new chunk, not from the cache): O(sink + window) slots;
* BlockSparse layers keep a ring of the last ``local_blocks`` blocks plus, in a region of their
  own, the vertical-stride blocks (per KV head where the heads differ).

After each write the cache drops every token no future query (position >= the sequence's
length) can read, so it holds exactly what the pattern can still read. Attention masks are
always rebuilt from ``pattern.allowed`` at the stored true positions, so the slot order never
matters for the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from megatron_longgen.attention.patterns import (
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    Pattern,
)


def kind_of(pattern: Pattern) -> str:
    return pattern.name  # "causal", "attn_sink" or "block_sparse"


# ---- slot layouts: where a token goes and whether a future query still reads it ----


@dataclass(frozen=True)
class FullSlots:
    max_length: int

    @property
    def capacity(self) -> int:
        return self.max_length

    def slot(self, pos: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return pos

    def keep(self, pos: torch.Tensor, length: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return pos >= 0


@dataclass(frozen=True)
class SinkSlots:
    pattern: AttnSinkPattern
    max_length: int

    @property
    def ring(self) -> int:
        # A future query q >= length reads k with q - k < window, i.e. k >= length - window + 1.
        return max(self.pattern.window_size - 1, 0)

    @property
    def capacity(self) -> int:
        return min(self.pattern.sink_tokens + self.ring, self.max_length)

    def slot(self, pos, offset):
        sink = self.pattern.sink_tokens
        ring = (pos - sink) % max(self.ring, 1) + sink
        return torch.where(pos < sink, pos, ring)

    def keep(self, pos, length, offset):
        w = self.pattern.window_size
        return (pos >= 0) & ((pos < self.pattern.sink_tokens) | (length - pos < w))


@dataclass(frozen=True)
class BlockSlots:
    """Local ring of ``local_blocks`` blocks (non-vertical blocks only), then one block per
    vertical block of the head up to ``max_length``."""

    pattern: BlockSparsePattern
    max_length: int

    @property
    def num_vertical(self) -> int:
        p = self.pattern
        blocks = torch.arange(math.ceil(self.max_length / p.block_size))
        offsets = p.head_offsets(range(p.num_heads)).unique()
        return max(int(p.vertical(blocks[None], offsets[:, None]).sum(-1).max()), 0)

    @property
    def local(self) -> int:  # no more ring blocks than the longest sequence has blocks
        return min(self.pattern.local_blocks, math.ceil(self.max_length / self.pattern.block_size))

    @property
    def capacity(self) -> int:
        return (self.local + self.num_vertical) * self.pattern.block_size

    def slot(self, pos, offset):
        p = self.pattern
        block, inner = pos // p.block_size, pos % p.block_size
        ring = (block % self.local) * p.block_size + inner
        vertical = (self.local + p.vertical_index(block, offset)) * p.block_size + inner
        return torch.where(p.vertical(block, offset), vertical, ring)

    def keep(self, pos, length, offset):
        p = self.pattern
        # The next query's block is the earliest any future query sits in.
        next_block = length // p.block_size
        local = next_block - pos // p.block_size < p.local_blocks
        return (pos >= 0) & (local | p.vertical(pos // p.block_size, offset))


def slots_for(pattern: Pattern, max_length: int):
    if isinstance(pattern, CausalPattern):
        return FullSlots(max_length)
    if isinstance(pattern, AttnSinkPattern):
        return SinkSlots(pattern, max_length)
    if isinstance(pattern, BlockSparsePattern):
        return BlockSlots(pattern, max_length)
    raise TypeError(f"no KV cache layout for pattern {pattern!r}")


# ---- one layer's cache ----


@dataclass
class LayerCache:
    """K/V of one attention layer: ``k``/``v`` [batch, kv_heads, slots, head_dim] and the
    global position of each slot ``pos`` [batch, kv_heads, slots] (-1 = empty)."""

    pattern: Pattern
    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor
    kv_heads: torch.Tensor  # global index of the first query head of each KV head
    layout: object = field(repr=False, default=None)

    @classmethod
    def allocate(cls, pattern, batch, num_kv_heads, heads_per_group, head_dim, max_length,
                 dtype, device, first_head: int = 0) -> "LayerCache":
        """``first_head``: global index of this rank's first query head (tensor parallelism
        splits heads; a heterogeneous pattern's offsets follow the global head)."""
        layout = slots_for(pattern, max_length)
        n = layout.capacity
        k = torch.zeros(batch, num_kv_heads, n, head_dim, dtype=dtype, device=device)
        pos = torch.full((batch, num_kv_heads, n), -1, dtype=torch.long, device=device)
        kv_heads = first_head + torch.arange(num_kv_heads, device=device) * heads_per_group
        return cls(pattern, k, torch.zeros_like(k), pos, kv_heads, layout)

    @property
    def kind(self) -> str:
        return kind_of(self.pattern)

    @property
    def offsets(self) -> torch.Tensor:
        """Vertical-stride offset per KV head, [1, kv_heads, 1] (zeros for other patterns)."""
        if isinstance(self.pattern, BlockSparsePattern):
            off = self.pattern.head_offsets(self.kv_heads.cpu()).to(self.pos.device)
        else:
            off = torch.zeros_like(self.kv_heads)
        return off.view(1, -1, 1)

    def nbytes(self) -> int:
        """Bytes allocated for K and V (positions are bookkeeping and not counted)."""
        return 2 * self.k.numel() * self.k.element_size()

    def used_slots(self) -> torch.Tensor:
        """Occupied slots per sequence and KV head [batch, kv_heads]."""
        return (self.pos >= 0).sum(-1)

    def held_positions(self, b: int, kv_head: int) -> List[int]:
        held = self.pos[b, kv_head]
        return sorted(held[held >= 0].tolist())

    def view(self, upto: Optional[int] = None):
        """(k, v, pos) over the first ``upto`` slots (full layers: the longest sequence)."""
        if upto is None or isinstance(self.layout, (SinkSlots, BlockSlots)):
            return self.k, self.v, self.pos
        return self.k[:, :, :upto], self.v[:, :, :upto], self.pos[:, :, :upto]

    def write(self, k_new, v_new, pos_new, valid, new_length) -> None:
        """Store the tokens of a chunk that a future query can read, drop what none can.

        k_new/v_new [batch, kv_heads, chunk, head_dim]; pos_new [batch, chunk] global
        positions; valid [batch, chunk] (False for padding); new_length [batch] lengths after
        the chunk.
        """
        off, length = self.offsets, new_length.view(-1, 1, 1)
        # Evict first: a kept new token may reuse the slot of an evicted one.
        self.pos.masked_fill_(~self.layout.keep(self.pos, length, off), -1)
        pos_h = pos_new[:, None, :].expand(-1, self.k.shape[1], -1)
        keep = valid[:, None, :] & self.layout.keep(pos_h, length, off)
        b, h, c = keep.nonzero(as_tuple=True)
        slot = self.layout.slot(pos_h, off)[b, h, c]
        if slot.numel() and int(slot.max()) >= self.k.shape[2]:
            raise ValueError(f"position {int(pos_h[b, h, c].max())} does not fit the cache "
                             f"({self.k.shape[2]} slots); raise max_length")
        self.k[b, h, slot] = k_new[b, h, c].to(self.k.dtype)
        self.v[b, h, slot] = v_new[b, h, c].to(self.v.dtype)
        self.pos[b, h, slot] = pos_h[b, h, c]


# ---- the whole model's cache ----


@dataclass
class KVCache:
    """Caches of every attention layer plus each sequence's length (tokens seen so far)."""

    layers: List[LayerCache]
    lengths: torch.Tensor  # [batch]
    max_length: int

    @classmethod
    def allocate(cls, patterns: Sequence[Pattern], batch: int, num_query_groups: int,
                 num_heads: int, head_dim: int, max_length: int, dtype=torch.float32,
                 device="cpu", first_heads: Optional[Sequence[int]] = None) -> "KVCache":
        """Heads and groups of this rank; ``first_heads``: per layer, the global index of its
        first query head (0 without tensor parallelism)."""
        per_group = num_heads // num_query_groups
        first_heads = first_heads or [0] * len(patterns)
        layers = [LayerCache.allocate(p, batch, num_query_groups, per_group, head_dim,
                                      max_length, dtype, device, first)
                  for p, first in zip(patterns, first_heads)]
        return cls(layers, torch.zeros(batch, dtype=torch.long, device=device), max_length)

    @classmethod
    def for_config(cls, config, batch: int, max_length: int, dtype=torch.float32,
                   device="cpu") -> "KVCache":
        """One cache per layer of a LongGenConfig (layers numbered 1..num_layers)."""
        patterns = [config.layer_pattern(n) for n in range(1, config.num_layers + 1)]
        return cls.allocate(patterns, batch, config.num_query_groups, config.num_attention_heads,
                            config.kv_channels, max_length, dtype, device)

    def nbytes_by_kind(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for layer in self.layers:
            out[layer.kind] = out.get(layer.kind, 0) + layer.nbytes()
        return out

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def report(self) -> str:
        lines = [f"{kind}: {n / 2**20:.2f} MiB" for kind, n in sorted(self.nbytes_by_kind().items())]
        return ", ".join(lines + [f"total: {self.nbytes() / 2**20:.2f} MiB"])
