"""Context parallelism for LongGen attention: a sequence sharded over the CP group.

* ``shard_batch_for_context_parallel``: Megatron's load-balanced split of a batch (and of
  packed-document boundaries) for this CP rank.
* ``ContextParallelAttention``: what LongGenCoreAttention calls when CP > 1. Full layers run
  ring attention; sparse layers run the pattern-aware K/V exchange of a static plan.
* ``COMM``: bytes sent per layer, kind (ring / exchange) and phase (fwd / bwd).

The pieces live in ``megatron_longgen.parallel.cp``; docs/context_parallel.md explains them.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_longgen.attention.patterns import CausalPattern, Pattern
from megatron_longgen.parallel.cp.comm import COMM, CommCounter, Ring, log
from megatron_longgen.parallel.cp.exchange import DevicePlan, exchange_attention
from megatron_longgen.parallel.cp.layout import (
    ContextParallelPackedParams,
    check_seq_len,
    local_positions,
    shard_batch_for_context_parallel,
)
from megatron_longgen.parallel.cp.plan import (
    exchange_bytes_sent,
    exchange_plan,
    needed_keys,
    ring_bytes_sent,
)
from megatron_longgen.parallel.cp.ring import RingSetup, ring_attention

__all__ = [
    "COMM", "CommCounter", "ContextParallelAttention", "ContextParallelPackedParams",
    "exchange_bytes_sent", "exchange_plan", "needed_keys", "ring_bytes_sent",
    "shard_batch_for_context_parallel",
]


class ContextParallelAttention:
    """Attention of one layer over a CP-sharded sequence.

    ``heads``: global query heads of this TP rank; ``kv_heads``: its global KV heads. Inputs are
    this rank's tokens (chunks r and 2*CP-1-r) as q [b, hq, 2c, d], k/v [b, hkv, 2c, d].
    """

    def __init__(self, pattern: Pattern, heads: torch.Tensor, kv_heads: Tuple[int, ...], scale: float,
                 group, layer_number: int):
        self.pattern, self.heads, self.kv_heads = pattern, heads, tuple(int(h) for h in kv_heads)
        self.scale, self.group, self.layer = scale, group, layer_number
        self.cp_size, self.cp_rank = dist.get_world_size(group), dist.get_rank(group)
        self._ring: Optional[Ring] = None
        self._static: Dict[tuple, object] = {}  # per (seq_len, documents, device): plans on device
        self._logged = False

    @property
    def is_full(self) -> bool:
        return isinstance(self.pattern, CausalPattern)

    def __call__(self, q, k, v, packed_seq_params=None) -> torch.Tensor:
        if q.shape[2] % 2:
            raise ValueError(
                f"context parallelism: the local sequence length {q.shape[2]} must be even (two "
                f"chunks per rank); the full sequence length must be divisible by 2 x CP = "
                f"{2 * self.cp_size}")
        seq_len = q.shape[2] * self.cp_size
        check_seq_len(seq_len, self.cp_size)
        cu = self._documents(packed_seq_params, q.shape[0], seq_len)
        key = (seq_len, cu, q.device)
        if key not in self._static:
            if len(self._static) >= 8:  # packed layouts change per batch: keep a few
                self._static.pop(next(iter(self._static)))
            self._static[key] = self._prepare(seq_len, cu, q.device, k)
        static = self._static[key]
        cu_t = static["cu"]
        if self.is_full:
            return ring_attention(q, k, v, static["ring"])
        return exchange_attention(q, k, v, static["q_pos"], static["plan"], self.group, self.layer,
                                  self.pattern, static["heads"], self.scale, cu_t)

    def _documents(self, packed, batch: int, seq_len: int) -> Optional[Tuple[int, ...]]:
        """Whole-sequence document boundaries as a tuple (they key the static plans)."""
        if packed is None:
            return None
        if packed.qkv_format == "thd" or not isinstance(packed, ContextParallelPackedParams):
            raise ValueError(
                "packed documents under context parallelism must be sharded with "
                "shard_batch_for_context_parallel (whole-sequence cu_seqlens travel with the shard)")
        if batch != 1:
            raise ValueError("packed documents (cu_seqlens) need micro-batch size 1")
        cu = tuple(int(x) for x in packed.cu_seqlens_q.tolist())  # one host read per batch
        if cu[-1] != seq_len:
            raise ValueError(f"cu_seqlens end at {cu[-1]}, not at the sequence length {seq_len}")
        return cu

    def _prepare(self, seq_len: int, cu, device, k) -> dict:
        """Everything static for a layout, computed once on the CPU and moved to the device."""
        cu_t = torch.tensor(cu, device=device) if cu is not None else None
        positions = torch.stack([local_positions(r, self.cp_size, seq_len) for r in range(self.cp_size)])
        heads = self.heads.to(device)
        static = {"cu": cu_t, "heads": heads, "q_pos": positions[self.cp_rank].to(device)}
        b, hkv, _, d = k.shape
        ring = ring_bytes_sent(seq_len, self.cp_size, b, hkv, d, k.element_size())
        if self.is_full:
            if self._ring is None:
                self._ring = Ring(self.group)
            static["ring"] = RingSetup(self._ring, self.pattern, heads, self.scale, self.layer,
                                       seq_len, positions.to(device), cu_t)
            sent = ring
        else:
            plan = exchange_plan(self.pattern, seq_len, self.cp_size, self.cp_rank, self.kv_heads, cu)
            static["plan"] = DevicePlan(plan, positions[self.cp_rank], device,
                                        self.pattern if cu is None else None)
            sent = plan.bytes_sent(b, d, k.element_size())
        if not self._logged:
            log.info("CP layer %d (%s, CP %d, L %d): forward sends %.3f MB per rank; ring %.3f MB",
                     self.layer, "ring" if self.is_full else f"{self.pattern.name} exchange",
                     self.cp_size, seq_len, sent / 1e6, ring / 1e6)
            self._logged = True
        return static


def for_core_attention(config, pattern: Pattern, heads: torch.Tensor, tp_rank: int,
                       groups_per_rank: int, scale: float, layer_number: int,
                       pg_collection=None) -> ContextParallelAttention:
    """Built by LongGenCoreAttention when ``config.context_parallel_size > 1``."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
    first = tp_rank * groups_per_rank
    return ContextParallelAttention(pattern, heads, tuple(range(first, first + groups_per_rank)),
                                    scale, group, layer_number)
