"""Pattern-aware K/V exchange for the sparse layers.

One all-to-all-v moves exactly the K/V rows the static plan lists (per KV head, token exact);
its backward is the reverse all-to-all with the gradients accumulated (index_add) into the
rows they came from, since one token may serve several ranks. The local queries then attend
to a compact key layout: per KV head, its local and received rows sorted by global position
(rows padded to the longest head with ``NO_KEY`` slots), with a per-row position vector, so
nothing of the global length (or chunk x chunk) is built. AttnSink layers without packed
documents take the dense flash kernels of ``sink_window.py`` instead where a window-capable
dense-pair backend runs (``backends.exchange_pair_backend``).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_longgen.attention.backends import exchange_pair_backend
from megatron_longgen.attention.patterns import Pattern
from megatron_longgen.parallel.cp import dense_pair  # noqa: F401  (registers the dense-pair backends)
from megatron_longgen.parallel.cp.comm import all_to_all_rows
from megatron_longgen.parallel.cp.compute import NO_KEY, chunk_attention
from megatron_longgen.parallel.cp.plan import ExchangePlan
from megatron_longgen.parallel.cp.sink_window import SinkWindowLayout, sink_window_attention


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
    """A rank's ExchangePlan as index tensors on the compute device; with the layer's
    ``pattern`` (no packed documents) also its ``SinkWindowLayout`` where one applies."""

    def __init__(self, plan: ExchangePlan, q_pos: torch.Tensor, device: torch.device,
                 pattern: Optional[Pattern] = None):
        self.send_splits, self.recv_splits = list(plan.send_splits), list(plan.recv_splits)
        c2 = len(q_pos)  # rows are h * 2c + local index
        self.send_head, self.send_pos = (plan.send_index // c2).to(device), (plan.send_index % c2).to(device)
        index, key_pos = compact_keys(plan, q_pos.cpu())
        self.key_index, self.key_pos = index.flatten().to(device), key_pos.to(device)
        self.sink_window = (SinkWindowLayout.build(pattern, q_pos.cpu(), index, key_pos, device)
                            if pattern is not None else None)


class ExchangeKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, dplan: DevicePlan, group, layer: int):
        # Rows straight from k/v (no copy of the whole K/V): [N, b, 2, d].
        send = torch.stack([k[:, dplan.send_head, dplan.send_pos], v[:, dplan.send_head, dplan.send_pos]],
                           dim=2).transpose(0, 1)
        recv = all_to_all_rows(send, dplan.send_splits, dplan.recv_splits, group, layer, "exchange", "fwd")
        ctx.dplan, ctx.group, ctx.layer, ctx.shape = dplan, group, layer, k.shape
        return recv  # [M, b, 2, d]

    @staticmethod
    def backward(ctx, grad_recv):
        dplan = ctx.dplan
        grad_send = all_to_all_rows(grad_recv, dplan.recv_splits, dplan.send_splits, ctx.group,
                                    ctx.layer, "exchange", "bwd")
        grad = grad_send.new_zeros((2,) + tuple(ctx.shape))
        # One token may serve several ranks: accumulate.
        batch = torch.arange(ctx.shape[0], device=grad.device)[:, None]
        for i in (0, 1):
            grad[i].index_put_((batch, dplan.send_head[None], dplan.send_pos[None]),
                               grad_send[:, :, i].transpose(0, 1), accumulate=True)
        return grad[0], grad[1], None, None, None


def exchange_kernel(dplan: DevicePlan, q: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """The dense-pair backend of the sink-window path for this layer, or None: the chunk path."""
    if dplan.sink_window is None or cu_seqlens is not None:
        return None
    return exchange_pair_backend(q.device, q.dtype, q.shape[-1])


def exchange_attention(q, k, v, q_pos: torch.Tensor, dplan: DevicePlan, group, layer: int,
                       pattern: Pattern, heads: torch.Tensor, scale: float,
                       cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [b, hq, 2c, d], k/v [b, hkv, 2c, d] (this rank's tokens) -> out [b, hq, 2c, d]."""
    b, hkv, c2, d = k.shape
    recv = ExchangeKV.apply(k, v, dplan, group, layer)
    kernel = exchange_kernel(dplan, q, cu_seqlens)
    if kernel is not None:
        return sink_window_attention(q, k, v, recv, dplan.sink_window, kernel, pattern, heads, scale)
    rows = torch.cat([torch.stack([k, v], dim=3).reshape(b, hkv * c2, 2, d), recv.permute(1, 0, 2, 3)], 1)
    keys = rows.index_select(1, dplan.key_index).view(b, hkv, -1, 2, d)
    return chunk_attention(q, keys[..., 0, :], keys[..., 1, :], q_pos, dplan.key_pos, pattern,
                           heads, scale, cu_seqlens)
