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

from megatron_longgen.attention.backends import exchange_pair_backend, resolve_backend
from megatron_longgen.attention.patterns import Pattern
from megatron_longgen.parallel.cp import dense_pair  # noqa: F401  (registers the dense-pair backends)
from megatron_longgen.parallel.cp.comm import all_to_all_rows
from megatron_longgen.parallel.cp.compute import NO_KEY, chunk_attention
from megatron_longgen.parallel.cp.plan import ExchangePlan
from megatron_longgen.parallel.cp.sink_window import SinkWindowLayout, chunk_backward, chunk_forward


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
        self.send_index = plan.send_index.to(device)
        self.send_head, self.send_pos = (plan.send_index // c2).to(device), (plan.send_index % c2).to(device)
        index, key_pos = compact_keys(plan, q_pos.cpu())
        self.key_index, self.key_pos = index.flatten().to(device), key_pos.to(device)
        self.sink_window = (SinkWindowLayout.build(pattern, q_pos.cpu(), index, key_pos, device)
                            if pattern is not None else None)


def _exchange_rows(k, v, dplan: DevicePlan, group, layer: int) -> torch.Tensor:
    """The forward all-to-all: the rows this rank sends, taken straight from k/v (no copy of
    the whole K/V) -> the received rows [M, b, 2, d]."""
    send = torch.stack([k[:, dplan.send_head, dplan.send_pos], v[:, dplan.send_head, dplan.send_pos]],
                       dim=2).transpose(0, 1)
    return all_to_all_rows(send, dplan.send_splits, dplan.recv_splits, group, layer, "exchange", "fwd")


def _return_grads(grad_recv: torch.Tensor, dplan: DevicePlan, group, layer: int,
                  grad_local: torch.Tensor) -> None:
    """The backward all-to-all: the received rows' gradients go back to their owners, which add
    them into their dK/dV ``grad_local`` [2, b, hkv * 2c, d] (one token may serve several ranks)."""
    grad_send = all_to_all_rows(grad_recv, dplan.recv_splits, dplan.send_splits, group, layer,
                                "exchange", "bwd")
    for i in (0, 1):
        grad_local[i].index_add_(1, dplan.send_index, grad_send[:, :, i].transpose(0, 1).to(grad_local.dtype))


class ExchangeKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, dplan: DevicePlan, group, layer: int):
        recv = _exchange_rows(k, v, dplan, group, layer)
        ctx.dplan, ctx.group, ctx.layer, ctx.shape = dplan, group, layer, k.shape
        return recv  # [M, b, 2, d]

    @staticmethod
    def backward(ctx, grad_recv):
        b, hkv, c2, d = ctx.shape
        grad = grad_recv.new_zeros(2, b, hkv, c2, d)
        _return_grads(grad_recv, ctx.dplan, ctx.group, ctx.layer, grad.view(2, b, hkv * c2, d))
        return grad[0], grad[1], None, None, None


class SinkWindowExchange(torch.autograd.Function):
    """A rank's whole AttnSink exchange on the sink-window path as one autograd node: the
    all-to-all, each windowed chunk's window run (halo rows then the chunk, one buffer each
    for K and V) and sink passes, and rank 0's first chunk on the one-GPU kernel. Its backward
    writes dQ, dK, dV into one buffer each and adds the halo, sink and returned rows' gradients
    in place: autograd sums no per-slice gradients of the whole K/V."""

    @staticmethod
    def forward(ctx, q, k, v, dplan: DevicePlan, group, layer: int, kernel, pattern, heads, scale: float):
        layout = dplan.sink_window
        recv = _exchange_rows(k, v, dplan, group, layer)
        b, hkv, _, d = k.shape
        halo, window = layout.window_size - 1, layout.window_size
        ks, vs = layout.sinks.rows(k, v, recv) if layout.sink_tokens else (None, None)
        out = q.new_empty(q.shape)
        runs, lses = [], []
        for i, gather in zip(layout.windowed, layout.halos):
            part = layout.part(i)
            kw, vw = (k.new_empty(b, hkv, halo + layout.chunk_len, d) for _ in range(2))
            gather.write(k, v, recv, kw[:, :, :halo], vw[:, :, :halo])
            kw[:, :, halo:].copy_(k[:, :, part])
            vw[:, :, halo:].copy_(v[:, :, part])
            out_i, lse = chunk_forward(q[:, :, part], kw, vw, ks, vs, kernel, scale, window)
            out[:, :, part] = out_i
            runs += [kw, vw]
            lses.append(lse)
        ctx.head = None
        if layout.head_chunk is not None:  # every key it reads is local: the one-GPU layer kernel
            part = layout.part(layout.head_chunk)
            with torch.enable_grad():
                leaves = [x[:, :, part].detach().requires_grad_() for x in (q, k, v)]
                head_out = resolve_backend("auto", pattern, q.device).fn(*leaves, pattern=pattern,
                                                                         heads=heads, scale=scale)
            out[:, :, part] = head_out.detach()
            ctx.head = (leaves, head_out)
        ctx.save_for_backward(q, out, ks, vs, *runs, *lses)
        ctx.dplan, ctx.group, ctx.layer, ctx.kernel, ctx.scale = dplan, group, layer, kernel, scale
        ctx.kv_shape, ctx.kv_dtype, ctx.recv_rows = k.shape, k.dtype, recv.shape[0]
        return out

    @staticmethod
    def backward(ctx, dout):
        q, out, ks, vs, *saved = ctx.saved_tensors
        dplan, layout = ctx.dplan, ctx.dplan.sink_window
        n = len(layout.windowed)
        runs, lses = saved[:2 * n], saved[2 * n:]
        b, hkv, c2, d = ctx.kv_shape
        halo, window = layout.window_size - 1, layout.window_size
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        grad_local = torch.empty(2, b, hkv, c2, d, dtype=ctx.kv_dtype, device=q.device)
        grad_recv = grad_local.new_zeros(ctx.recv_rows, b, 2, d)
        halo_grads, sink_grads = [], None
        for j, (i, gather) in enumerate(zip(layout.windowed, layout.halos)):
            part = layout.part(i)
            kw, vw = runs[2 * j], runs[2 * j + 1]
            dkw, dvw, dks, dvs = chunk_backward(q[:, :, part], kw, vw, ks, vs, out[:, :, part], lses[j],
                                                dout[:, :, part], ctx.kernel, ctx.scale, window, dq[:, :, part])
            grad_local[0][:, :, part] = dkw[:, :, halo:]
            grad_local[1][:, :, part] = dvw[:, :, halo:]
            halo_grads.append((gather, dkw[:, :, :halo], dvw[:, :, :halo]))
            if dks is not None:
                pair = (dks.float(), dvs.float())
                sink_grads = pair if sink_grads is None else (sink_grads[0] + pair[0], sink_grads[1] + pair[1])
        if ctx.head is not None:
            (qh, kh, vh), head_out = ctx.head
            part = layout.part(layout.head_chunk)
            torch.autograd.backward(head_out, dout[:, :, part])
            dq[:, :, part], grad_local[0][:, :, part], grad_local[1][:, :, part] = qh.grad, kh.grad, vh.grad
            ctx.head = None
        # Rows read by more than their own chunk: halos and sinks, local or received.
        flat = grad_local.view(2, b, hkv * c2, d)
        for gather, grad_k, grad_v in halo_grads:
            gather.add_grads(grad_k, grad_v, flat, grad_recv)
        if sink_grads is not None:
            layout.sinks.add_grads(*sink_grads, flat, grad_recv)
        _return_grads(grad_recv, dplan, ctx.group, ctx.layer, flat)
        return (dq, grad_local[0], grad_local[1]) + (None,) * 7


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
    kernel = exchange_kernel(dplan, q, cu_seqlens)
    if kernel is not None:
        return SinkWindowExchange.apply(q, k, v, dplan, group, layer, kernel, pattern, heads, scale)
    recv = ExchangeKV.apply(k, v, dplan, group, layer)
    rows = torch.cat([torch.stack([k, v], dim=3).reshape(b, hkv * c2, 2, d), recv.permute(1, 0, 2, 3)], 1)
    keys = rows.index_select(1, dplan.key_index).view(b, hkv, -1, 2, d)
    return chunk_attention(q, keys[..., 0, :], keys[..., 1, :], q_pos, dplan.key_pos, pattern,
                           heads, scale, cu_seqlens)
