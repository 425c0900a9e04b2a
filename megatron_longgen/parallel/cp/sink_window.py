"""The AttnSink exchange on dense flash kernels (no packed documents).

A query chunk starting at global position ``start`` reads the sink tokens [0, S) and the window
(q - W, q]. When ``start >= S + W - 1`` the two never overlap, and the window's keys are one
contiguous run [start - W + 1, start + c): a sliding-window pass over that run (a dense-pair
backend with ``window=W``, e.g. FA4's) plus a dense pass over the S sink keys, merged by their
LSE, is the chunk's attention. Both passes' backward take the final merged output and LSE.

The chunk at position 0 (CP rank 0's first) holds every key it reads: it runs the one-GPU
layer kernel (``attention/backends.py``'s choice for the pattern). A layout whose chunk starts
inside (0, S + W - 1) (chunks shorter than the window) has no ``SinkWindowLayout``: the compact
chunk path serves it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from megatron_longgen.attention.backends import DensePairBackend, resolve_backend
from megatron_longgen.attention.patterns import AttnSinkPattern, Pattern
from megatron_longgen.parallel.cp.compute import merge


@dataclass(frozen=True)
class RowGather:
    """K/V rows of (KV head, global position) pairs, head-major, taken straight from this
    rank's K/V (``local_head``, ``local_index``) or from the received rows (``recv_row``):
    no copy of the rank's whole K/V is made. ``order`` puts cat(local, received) in place."""

    per_head: int
    local_head: torch.Tensor
    local_index: torch.Tensor
    recv_row: torch.Tensor
    order: torch.Tensor

    @staticmethod
    def build(rows: torch.Tensor, num_local: int, chunk2: int, per_head: int, device) -> "RowGather":
        """From flat row indices [hkv * per_head] into cat(local [hkv * 2c], received)."""
        local = rows < num_local
        order = torch.empty(len(rows), dtype=torch.long)
        order[local] = torch.arange(int(local.sum()))
        order[~local] = int(local.sum()) + torch.arange(int((~local).sum()))
        fields = (rows[local] // chunk2, rows[local] % chunk2, rows[~local] - num_local, order)
        return RowGather(per_head, *(t.to(device) for t in fields))

    def __call__(self, k, v, recv) -> Tuple[torch.Tensor, torch.Tensor]:
        """k/v [b, hkv, 2c, d], recv [M, b, 2, d] -> K and V rows [b, hkv, per_head, d]."""
        b, hkv, _, d = k.shape
        received = recv.index_select(0, self.recv_row)  # [n, b, 2, d]

        def take(x, i):
            rows = torch.cat([x[:, self.local_head, self.local_index], received[:, :, i].transpose(0, 1)], 1)
            return rows.index_select(1, self.order).view(b, hkv, self.per_head, d)

        return take(k, 0), take(v, 1)


@dataclass(frozen=True)
class SinkWindowLayout:
    """What each chunk reads. For each windowed chunk ``windowed[i]``, ``halos[i]``: the W - 1
    keys before it (its window run is that halo then the chunk itself); ``sinks``: the S sink
    keys; ``head_chunk``: the local chunk at position 0, if this rank holds it."""

    chunk_len: int
    sink_tokens: int
    window_size: int
    windowed: Tuple[int, ...]
    halos: Tuple[RowGather, ...]
    sinks: RowGather
    head_chunk: Optional[int]

    @staticmethod
    def build(pattern: Pattern, q_pos: torch.Tensor, key_index: torch.Tensor, key_pos: torch.Tensor,
              device) -> Optional["SinkWindowLayout"]:
        """The layout for a rank's positions ``q_pos`` [2c] and compact keys (``index`` and
        ``key_pos`` [hkv, S] of ``exchange.compact_keys``), or None where it does not apply."""
        if not isinstance(pattern, AttnSinkPattern):
            return None
        sink, window, c = pattern.sink_tokens, pattern.window_size, len(q_pos) // 2
        starts = [int(q_pos[0]), int(q_pos[c])]
        if any(0 < s < sink + window - 1 for s in starts):
            return None
        lookup = _RowLookup(key_index, key_pos)
        num_local = len(key_index) * 2 * c

        def gather(positions: torch.Tensor) -> RowGather:
            return RowGather.build(lookup(positions), num_local, 2 * c, len(positions), device)

        windowed = tuple(i for i, s in enumerate(starts) if s > 0)
        halos = tuple(gather(torch.arange(starts[i] - window + 1, starts[i])) for i in windowed)
        head = next((i for i, s in enumerate(starts) if s == 0), None)
        return SinkWindowLayout(c, sink, window, windowed, halos, gather(torch.arange(sink)), head)


class _RowLookup:
    """Row index of (KV head, global position) in the compact layout, for every KV head."""

    def __init__(self, key_index: torch.Tensor, key_pos: torch.Tensor):
        self.index, self.pos = key_index, key_pos

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """[hkv * len(positions)]: each KV head's rows of ``positions`` (all must be present)."""
        if not len(positions):
            return torch.zeros(0, dtype=torch.long)
        column = torch.searchsorted(self.pos, positions.expand(len(self.pos), -1).contiguous())
        column = column.clamp(max=self.pos.shape[1] - 1)
        found = torch.gather(self.pos, 1, column)
        if not torch.equal(found, positions.expand_as(found)):
            raise RuntimeError("the exchange plan lacks keys the AttnSink window layout reads")
        return torch.gather(self.index, 1, column).flatten()


def _merge_passes(out_w, lse_w, out_s, lse_s, dtype: torch.dtype):
    """The two passes' softmaxes merged by LSE (float32 math), the output in ``dtype``."""
    out, lse = merge(out_w.to(torch.promote_types(dtype, torch.float32)), lse_w, out_s, lse_s)
    return out.to(dtype), lse


def _sum_grads(a, b, dtype: torch.dtype):
    return (a.to(torch.promote_types(dtype, torch.float32)) + b).to(dtype)


@functools.lru_cache(maxsize=None)
def _fused(fn):
    """``fn`` as one compiled kernel on CUDA: unfused, its float32 passes over [b, h, c, d]
    cost about as much as the sink pass itself."""
    return torch.compile(fn, dynamic=False)


def _on(device: torch.device, fn):
    return _fused(fn) if device.type == "cuda" else fn


class SinkWindowAttention(torch.autograd.Function):
    """One query chunk: a window pass over its contiguous keys and a dense pass over the sinks,
    merged by LSE; the backward gives each pass the final output and LSE."""

    @staticmethod
    def forward(ctx, q, kw, vw, ks, vs, kernel: DensePairBackend, scale: float, window: int):
        out, lse = kernel.forward(q, kw, vw, scale, True, window=window)
        if ks is not None:
            out, lse = _on(q.device, _merge_passes)(out, lse, *kernel.forward(q, ks, vs, scale, False), q.dtype)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, kw, vw, ks, vs, out, lse)
        ctx.kernel, ctx.scale, ctx.window = kernel, scale, window
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kw, vw, ks, vs, out, lse = ctx.saved_tensors
        kernel, scale = ctx.kernel, ctx.scale
        dq, dkw, dvw = kernel.backward(q, kw, vw, out, lse, dout, scale, True, window=ctx.window)
        dks = dvs = None
        if ks is not None:
            dq_sink, dks, dvs = kernel.backward(q, ks, vs, out, lse, dout, scale, False)
            dq = _on(q.device, _sum_grads)(dq, dq_sink, q.dtype)
            dks, dvs = dks.to(ks.dtype), dvs.to(vs.dtype)
        return (dq.to(q.dtype), dkw.to(kw.dtype), dvw.to(vw.dtype), dks, dvs, None, None, None)


def sink_window_attention(q, k, v, recv, layout: SinkWindowLayout, kernel: DensePairBackend,
                          pattern: AttnSinkPattern, heads: torch.Tensor, scale: float) -> torch.Tensor:
    """q [b, hq, 2c, d], k/v [b, hkv, 2c, d] (this rank's tokens), recv [M, b, 2, d] (the
    received K/V rows) -> out [b, hq, 2c, d]."""
    c = layout.chunk_len
    outs: List[Optional[torch.Tensor]] = [None, None]
    if layout.windowed:
        ks, vs = layout.sinks(k, v, recv) if layout.sink_tokens else (None, None)
        for i, halo in zip(layout.windowed, layout.halos):
            part = slice(i * c, (i + 1) * c)
            kh, vh = halo(k, v, recv)
            kw, vw = torch.cat([kh, k[:, :, part]], 2), torch.cat([vh, v[:, :, part]], 2)
            outs[i] = SinkWindowAttention.apply(q[:, :, part], kw, vw, ks, vs, kernel, scale,
                                                layout.window_size)
    if layout.head_chunk is not None:  # every key it reads is local: the one-GPU layer kernel
        part = slice(layout.head_chunk * c, (layout.head_chunk + 1) * c)
        backend = resolve_backend("auto", pattern, q.device)
        outs[layout.head_chunk] = backend.fn(q[:, :, part], k[:, :, part], v[:, :, part],
                                             pattern=pattern, heads=heads, scale=scale)
    return torch.cat(outs, dim=2)
