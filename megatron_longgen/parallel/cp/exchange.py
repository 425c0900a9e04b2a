"""Pattern-aware K/V exchange for the sparse layers.

One all-to-all-v moves exactly the K/V rows the static plan lists (per KV head, token exact);
its backward is the reverse all-to-all with the gradients accumulated (index_add) into the
rows they came from, since one token may serve several ranks. The local queries then attend
to a compact key layout: per KV head, its local and received rows sorted by global position
(rows padded to the longest head with ``NO_KEY`` slots), with a per-row position vector, so
nothing of the global length (or chunk x chunk) is built.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_longgen.attention.patterns import Pattern
from megatron_longgen.parallel.cp.comm import all_to_all_rows
from megatron_longgen.parallel.cp.compute import NO_KEY, chunk_attention
from megatron_longgen.parallel.cp.plan import ExchangePlan


def compact_keys(plan: ExchangePlan, q_pos: torch.Tensor):
    """Per KV head, the sorted key rows it may read: ``index`` [hkv, S] into the rows
    ``cat(local [hkv * 2c], received [M])`` and their global positions ``key_pos`` [hkv, S]
    (``NO_KEY`` past a head's end, whose index is 0)."""
    hkv, c2, width = plan.num_kv_heads, len(q_pos), max(len(plan.extra_pos), 1)
    recv = plan.recv_slot
    head = torch.cat([torch.arange(hkv).repeat_interleave(c2), recv // width])
    pos = torch.cat([q_pos.repeat(hkv), plan.extra_pos[recv % width]])
    src = torch.arange(len(head))  # local rows first (h * 2c + i), then received ones
    order = torch.argsort(head * plan.seq_len + pos)
    head, pos, src = head[order], pos[order], src[order]
    counts = torch.bincount(head, minlength=hkv)
    column = torch.arange(len(head)) - (counts.cumsum(0) - counts)[head]
    index = torch.zeros(hkv, int(counts.max()), dtype=torch.long)
    key_pos = torch.full(index.shape, NO_KEY, dtype=torch.long)
    index[head, column], key_pos[head, column] = src, pos
    return index, key_pos


class DevicePlan:
    """A rank's ExchangePlan as index tensors on the compute device."""

    def __init__(self, plan: ExchangePlan, q_pos: torch.Tensor, device: torch.device):
        self.send_splits, self.recv_splits = list(plan.send_splits), list(plan.recv_splits)
        self.send_index = plan.send_index.to(device)
        index, key_pos = compact_keys(plan, q_pos.cpu())
        self.key_index, self.key_pos = index.flatten().to(device), key_pos.to(device)


class ExchangeKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, dplan: DevicePlan, group, layer: int):
        b, hkv, c2, d = k.shape
        rows = torch.stack([k, v], dim=3).reshape(b, hkv * c2, 2, d)
        send = rows.index_select(1, dplan.send_index).permute(1, 0, 2, 3)  # [N, b, 2, d]
        recv = all_to_all_rows(send, dplan.send_splits, dplan.recv_splits, group, layer, "exchange", "fwd")
        ctx.dplan, ctx.group, ctx.layer, ctx.shape = dplan, group, layer, k.shape
        return recv  # [M, b, 2, d]

    @staticmethod
    def backward(ctx, grad_recv):
        dplan = ctx.dplan
        b, hkv, c2, d = ctx.shape
        grad_send = all_to_all_rows(grad_recv, dplan.recv_splits, dplan.send_splits, ctx.group,
                                    ctx.layer, "exchange", "bwd")
        grad = grad_send.new_zeros(b, hkv * c2, 2, d)
        grad.index_add_(1, dplan.send_index, grad_send.permute(1, 0, 2, 3))
        grad = grad.view(b, hkv, c2, 2, d)
        return grad[..., 0, :], grad[..., 1, :], None, None, None


def exchange_attention(q, k, v, q_pos: torch.Tensor, dplan: DevicePlan, group, layer: int,
                       pattern: Pattern, heads: torch.Tensor, scale: float,
                       cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [b, hq, 2c, d], k/v [b, hkv, 2c, d] (this rank's tokens) -> out [b, hq, 2c, d]."""
    b, hkv, c2, d = k.shape
    recv = ExchangeKV.apply(k, v, dplan, group, layer)
    rows = torch.cat([torch.stack([k, v], dim=3).reshape(b, hkv * c2, 2, d), recv.permute(1, 0, 2, 3)], 1)
    keys = rows.index_select(1, dplan.key_index).view(b, hkv, -1, 2, d)
    return chunk_attention(q, keys[..., 0, :], keys[..., 1, :], q_pos, dplan.key_pos, pattern,
                           heads, scale, cu_seqlens)
