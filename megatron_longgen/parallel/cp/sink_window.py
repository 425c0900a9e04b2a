"""The AttnSink exchange on dense flash kernels (no packed documents).

A query chunk starting at global position ``start`` reads the sink tokens [0, S) and the window
(q - W, q]. When ``start >= S + W - 1`` the two never overlap, and the window's keys are one
contiguous run [start - W + 1, start + c): a sliding-window pass over that run (a dense-pair
backend with ``window=W``, e.g. FA4's) plus a dense pass over the S sink keys, merged by their
LSE, is the chunk's attention. Both passes' backward take the final merged output and LSE.

The chunk at position 0 (CP rank 0's first) holds every key it reads: it runs the one-GPU
layer kernel (``attention/backends.py``'s choice for the pattern). A layout whose chunk starts
inside (0, S + W - 1) (chunks shorter than the window) has no ``SinkWindowLayout``: the compact
chunk path serves it. ``exchange.SinkWindowExchange`` runs a rank's chunks (``chunk_forward`` /
``chunk_backward``) in one autograd node.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_longgen.attention.backends import DensePairBackend
from megatron_longgen.attention.patterns import AttnSinkPattern, Pattern
from megatron_longgen.parallel.cp.compute import merge


@dataclass(frozen=True)
class RowGather:
    """K/V rows of (KV head, global position) pairs, head-major [hkv, per_head], taken straight
    from this rank's K/V (rows ``local_row`` = h * 2c + i, written to ``local_dst``) or from
    the received rows (``recv_row``, written to ``recv_dst``): no copy of the rank's whole K/V.
    Destinations are (head, index) pairs of the [b, hkv, per_head, d] rows."""

    per_head: int
    local_row: torch.Tensor
    local_src: Tuple[torch.Tensor, torch.Tensor]
    local_dst: Tuple[torch.Tensor, torch.Tensor]
    recv_row: torch.Tensor
    recv_dst: Tuple[torch.Tensor, torch.Tensor]

    @staticmethod
    def build(rows: torch.Tensor, num_local: int, chunk2: int, per_head: int, device) -> "RowGather":
        """From flat row indices [hkv * per_head] into cat(local [hkv * 2c], received)."""
        local = rows < num_local
        dst = torch.arange(len(rows))

        def pair(flat, width):
            return flat.div(width, rounding_mode="floor").to(device), (flat % width).to(device)

        return RowGather(per_head, rows[local].to(device), pair(rows[local], chunk2),
                         pair(dst[local], per_head), (rows[~local] - num_local).to(device),
                         pair(dst[~local], per_head))

    @property
    def all_received(self) -> bool:
        return not len(self.local_row)

    def write(self, k, v, recv, out_k, out_v) -> None:
        """k/v [b, hkv, 2c, d], recv [M, b, 2, d] -> the rows into out_k/out_v [b, hkv, n, d]."""
        if len(self.recv_row):
            rows = recv.index_select(0, self.recv_row)  # [r, b, 2, d], destination order
            if self.all_received:  # every destination, in order: one strided copy each
                rows = rows.view(out_k.shape[1], self.per_head, *rows.shape[1:]).permute(2, 0, 1, 3, 4)
                out_k.copy_(rows[..., 0, :])
                out_v.copy_(rows[..., 1, :])
            else:
                out_k[:, self.recv_dst[0], self.recv_dst[1]] = rows[:, :, 0].transpose(0, 1)
                out_v[:, self.recv_dst[0], self.recv_dst[1]] = rows[:, :, 1].transpose(0, 1)
        if len(self.local_row):
            out_k[:, self.local_dst[0], self.local_dst[1]] = k[:, self.local_src[0], self.local_src[1]]
            out_v[:, self.local_dst[0], self.local_dst[1]] = v[:, self.local_src[0], self.local_src[1]]

    def rows(self, k, v, recv) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rows as new tensors [b, hkv, n, d]."""
        b, hkv, _, d = k.shape
        out_k, out_v = (k.new_empty(b, hkv, self.per_head, d) for _ in range(2))
        self.write(k, v, recv, out_k, out_v)
        return out_k, out_v

    def add_grads(self, grad_k, grad_v, grad_local, grad_recv) -> None:
        """The rows' gradients (grad_k/grad_v [b, hkv, n, d]) added into ``grad_local``
        [2, b, hkv * 2c, d] (this rank's dK, dV) and ``grad_recv`` [M, b, 2, d]; a row read
        twice gets both."""
        if len(self.recv_row):
            if self.all_received:
                rows = torch.stack([grad_k, grad_v], 3).permute(1, 2, 0, 3, 4).flatten(0, 1)
            else:
                rows = torch.stack([g[:, self.recv_dst[0], self.recv_dst[1]] for g in (grad_k, grad_v)], 2)
                rows = rows.transpose(0, 1)
            grad_recv.index_add_(0, self.recv_row, rows.to(grad_recv.dtype))
        if len(self.local_row):
            for i, g in enumerate((grad_k, grad_v)):
                grad_local[i].index_add_(1, self.local_row, g[:, self.local_dst[0], self.local_dst[1]].to(grad_local.dtype))


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

    def part(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_len, (chunk + 1) * self.chunk_len)


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


@functools.lru_cache(maxsize=None)
def _fused(fn):
    """``fn`` as one compiled kernel on CUDA: unfused, its float32 passes over [b, h, c, d]
    cost about as much as the sink pass itself."""
    return torch.compile(fn, dynamic=False)


def _on(device: torch.device, fn):
    return _fused(fn) if device.type == "cuda" else fn


def chunk_forward(q, kw, vw, ks, vs, kernel: DensePairBackend, scale: float, window: int):
    """One query chunk q [b, hq, c, d] over its window run kw/vw [b, hkv, W - 1 + c, d] and the
    sinks ks/vs [b, hkv, S, d] (None without sinks) -> out in q's dtype, lse float32."""
    out, lse = kernel.forward(q, kw, vw, scale, True, window=window)
    if ks is not None:
        out, lse = _on(q.device, _merge_passes)(out, lse, *kernel.forward(q, ks, vs, scale, False), q.dtype)
    return out.to(q.dtype), lse


def chunk_backward(q, kw, vw, ks, vs, out, lse, dout, kernel: DensePairBackend, scale: float,
                   window: int, dq: torch.Tensor):
    """The chunk's gradients from the final output and LSE: dq written into ``dq`` (q's shape
    and dtype); returns dkw, dvw and dks, dvs (None without sinks), in the inputs' dtypes."""
    dq_window, dkw, dvw = kernel.backward(q, kw, vw, out, lse, dout, scale, True, window=window)
    dks = dvs = None
    if ks is not None:
        dq_sink, dks, dvs = kernel.backward(q, ks, vs, out, lse, dout, scale, False)
        # One rounding to q's dtype: torch.add computes 16-bit sums in float32.
        torch.add(dq_window, dq_sink, out=dq)
        dks, dvs = dks.to(ks.dtype), dvs.to(vs.dtype)
    else:
        dq.copy_(dq_window)
    return dkw.to(kw.dtype), dvw.to(vw.dtype), dks, dvs
