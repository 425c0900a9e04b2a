"""Pattern-aware K/V exchange for the sparse layers.

One all-to-all-v moves exactly the K/V rows the static plan lists (per KV head, token exact);
its backward is the reverse all-to-all with the gradients accumulated (index_add) into the
rows they came from, since one token may serve several ranks. The local queries then attend
to local plus received keys at their true global positions.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_longgen.attention.patterns import Pattern
from megatron_longgen.parallel.cp.comm import all_to_all_rows
from megatron_longgen.parallel.cp.compute import attend
from megatron_longgen.parallel.cp.plan import ExchangePlan


class DevicePlan:
    """A rank's ExchangePlan as index tensors on the compute device."""

    def __init__(self, plan: ExchangePlan, device: torch.device):
        self.send_splits, self.recv_splits = list(plan.send_splits), list(plan.recv_splits)
        self.send_index = plan.send_index.to(device)
        self.recv_slot = plan.recv_slot.to(device)
        self.extra_pos = plan.extra_pos.to(device)


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
    b, hkv, _, d = k.shape
    recv = ExchangeKV.apply(k, v, dplan, group, layer)
    extra = len(dplan.extra_pos)
    # Rows land at (head, column); columns a head did not receive stay zero and are masked,
    # because the plan sent every key any local query of that head may read.
    table = recv.new_zeros(hkv * extra, b, 2, d).index_copy(0, dplan.recv_slot, recv)
    table = table.view(hkv, extra, b, 2, d).permute(2, 0, 1, 3, 4)
    k_all = torch.cat([k, table[..., 0, :]], dim=2)
    v_all = torch.cat([v, table[..., 1, :]], dim=2)
    k_pos = torch.cat([q_pos, dplan.extra_pos])
    out, _ = attend(q, k_all, v_all, q_pos, k_pos, pattern, heads, scale, cu_seqlens)
    return out
