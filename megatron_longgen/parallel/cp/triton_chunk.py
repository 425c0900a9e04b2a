"""The Triton path of ``attend`` / ``attend_backward``: one chunk pair, keys at any positions.

Queries sit at global positions ``q_pos`` [sq]; keys at ``k_pos`` [sk] (shared by the KV
heads: a ring step's chunk) or [hkv, sk] (one sorted row list per KV head: the exchange's
compact layout, padded with ``NO_KEY``). The kernels (``triton_kernels/chunk_kernels.py``)
evaluate the pattern at document-relative positions; which tiles they visit comes from
per-tile position bounds, so nothing of size sq x sk exists but the [tiles x tiles] lists.

Dtypes: bf16/fp16 (or fp32) inputs; scores, softmax and the output accumulate in float32.
The forward returns the output in float32 (the ring merges partial outputs in float32) and the
natural LSE; the backward accumulates dQ, dK and dV in float32 and returns them in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from megatron_longgen.attention.patterns import (
    EMPTY,
    FULL,
    PARTIAL,
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    Pattern,
)
from megatron_longgen.attention.triton_kernels import chunk_kernels
from megatron_longgen.attention.triton_kernels.layout import pattern_params
from megatron_longgen.attention.triton_kernels.sparse_attention import Tiles, _fit_tiles, default_tiles
from megatron_longgen.parallel.cp.compute import NO_KEY
from megatron_longgen.parallel.cp.layout import doc_relative

LOG2E = math.log2(math.e)
HEAD_DIMS = (16, 32, 64, 128)
assert NO_KEY == chunk_kernels.NO_KEY, "the kernels' padding position must match compute.NO_KEY"


# ---------------------------------------------------------------- tile states from bounds

def _block_sparse_bounds(p: BlockSparsePattern, q_lo, q_hi, k_lo, k_hi, offset) -> torch.Tensor:
    """States of tiles whose queries lie in [q_lo, q_hi) and keys in [k_lo, k_hi) (any subset
    of those ranges): EMPTY / FULL only when true of every pair in the ranges."""
    bs = p.block_size
    qb_lo, qb_hi, kb_lo, kb_hi = q_lo // bs, (q_hi - 1) // bs, k_lo // bs, (k_hi - 1) // bs
    causal_any = k_lo <= q_hi - 1
    local_any = (qb_lo - kb_hi).clamp(min=0) < p.local_blocks
    last = torch.minimum(kb_hi, qb_hi)
    vertical_any = p.vertical_index(last + 1, offset) > p.vertical_index(kb_lo, offset)
    any_allowed = causal_any & (local_any | vertical_any)
    one_vertical_block = (kb_lo == kb_hi) & p.vertical(kb_lo, offset)
    all_allowed = (k_hi - 1 <= q_lo) & ((qb_hi - kb_lo < p.local_blocks) | one_vertical_block)
    state = torch.where(any_allowed, PARTIAL, EMPTY)
    return torch.where(any_allowed & all_allowed, FULL, state).to(torch.int8)


def bound_states(pattern: Pattern, q_lo, q_hi, k_lo, k_hi, offset) -> torch.Tensor:
    """Conservative tile states from position ranges (document-relative, broadcasting)."""
    if isinstance(pattern, (CausalPattern, AttnSinkPattern)):
        return pattern.tile_states(q_lo, q_hi, k_lo, k_hi)  # exact bounds for any subset
    if isinstance(pattern, BlockSparsePattern):
        return _block_sparse_bounds(pattern, q_lo, q_hi, k_lo, k_hi, offset)
    raise TypeError(f"no chunk kernel for pattern {pattern!r}")


@dataclass
class _Bounds:
    """Per tile of a [rows, n] position list: position range, document range, validity."""

    lo: torch.Tensor  # smallest valid position
    hi: torch.Tensor  # largest valid position + 1
    doc_lo: torch.Tensor
    doc_hi: torch.Tensor
    start: torch.Tensor  # start of doc_lo's document
    any_valid: torch.Tensor
    all_valid: torch.Tensor


def _bounds(pos: torch.Tensor, block: int, cu: Optional[torch.Tensor]) -> _Bounds:
    rows, n = pos.shape
    tiles = triton.cdiv(n, block)
    padded = pos.new_full((rows, tiles * block), NO_KEY)
    padded[:, :n] = pos
    padded = padded.view(rows, tiles, block)
    valid = padded < NO_KEY
    lo = torch.where(valid, padded, NO_KEY).amin(-1)
    hi = torch.where(valid, padded, -1).amax(-1) + 1
    if cu is None:
        zero = torch.zeros_like(lo)
        return _Bounds(lo, hi, zero, zero, zero, valid.any(-1), valid.all(-1))
    last = cu[-1] - 1  # a tensor: no host sync
    doc_lo, rel_lo = doc_relative(torch.minimum(lo, last), cu)
    doc_hi, _ = doc_relative(torch.minimum((hi - 1).clamp(min=0), last), cu)
    return _Bounds(lo, hi, doc_lo, doc_hi, lo - rel_lo, valid.any(-1), valid.all(-1))


def tile_states(pattern: Pattern, q_pos: torch.Tensor, k_pos: torch.Tensor, offsets: torch.Tensor,
                block_q: int, block_k: int, cu: Optional[torch.Tensor]):
    """States [R, q tiles, k tiles] and whether each tile needs the element mask; R is the
    number of tile-list rows (``offsets``: a BlockSparse offset per row)."""
    q = _bounds(q_pos[None], block_q, cu)
    k = _bounds(k_pos, block_k, cu)
    qx = lambda t: t[:, :, None]  # noqa: E731  [1, nq, 1]
    kx = lambda t: t[:, None, :]  # noqa: E731  [Rk, 1, nk]
    off = offsets[:, None, None]
    if cu is None:
        states = bound_states(pattern, qx(q.lo), qx(q.hi), kx(k.lo), kx(k.hi), off)
    else:  # the pattern where a tile lies in one document; documents apart: nothing
        same = (qx(q.doc_lo) == qx(q.doc_hi)) & (kx(k.doc_lo) == kx(k.doc_hi)) & (qx(q.doc_lo) == kx(k.doc_lo))
        inside = bound_states(pattern, qx(q.lo - q.start), qx(q.hi - q.start), kx(k.lo - k.start),
                              kx(k.hi - k.start), off)
        apart = (kx(k.doc_hi) < qx(q.doc_lo)) | (kx(k.doc_lo) > qx(q.doc_hi)) | (kx(k.lo) > qx(q.hi) - 1)
        states = torch.where(same, inside, torch.where(apart, EMPTY, PARTIAL).to(torch.int8))
    states = torch.where(qx(q.any_valid) & kx(k.any_valid), states, EMPTY).to(torch.int8)
    needs_mask = (states != FULL) | ~qx(q.all_valid) | ~kx(k.all_valid)
    return states.expand(len(offsets), -1, -1), needs_mask.expand(len(offsets), -1, -1)


@dataclass
class TileLists:
    entries: torch.Tensor  # int32 [R, rows, width]: tile indices, unmasked ones first
    counts: torch.Tensor  # int32 [R, rows, 2]: (unmasked tiles, all tiles)
    row_stride: int  # rows per KV head in the flattened lists (0: one row set for all heads)


def tile_lists(states: torch.Tensor, needs_mask: torch.Tensor, transpose: bool, per_head: bool) -> TileLists:
    """Per query tile the key tiles it reads (or per key tile the query tiles reading it);
    the width is every tile, so building them needs no host sync."""
    if transpose:
        states, needs_mask = states.transpose(1, 2), needs_mask.transpose(1, 2)
    nonempty = states != EMPTY
    unmasked = nonempty & ~needs_mask
    counts = torch.stack([unmasked.sum(-1), nonempty.sum(-1)], -1).to(torch.int32)
    rank = torch.where(unmasked, 0, torch.where(nonempty, 1, 2)).to(torch.int8)
    entries = torch.sort(rank, dim=-1, stable=True).indices.to(torch.int32)
    return TileLists(entries.contiguous(), counts.contiguous(), states.shape[1] if per_head else 0)


# ---------------------------------------------------------------- launches

class _Chunk:
    """Positions, documents, head offsets and tile sizes one pair's launches share."""

    def __init__(self, q, k, q_pos, k_pos, pattern, heads, scale, cu_seqlens, tiles: Optional[Tiles]):
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        if d not in HEAD_DIMS:
            raise ValueError(f"head dim {d} is not supported by the chunk kernels {HEAD_DIMS}")
        if cu_seqlens is not None and b != 1:
            raise ValueError("packed documents (cu_seqlens) need batch size 1")
        device = q.device
        self.pattern, self.scale, self.group, self.sq, self.sk = pattern, scale, hq // hkv, sq, sk
        self.tiles = _fit_tiles(tiles or default_tiles(pattern, q.dtype), pattern)
        self.kind, self.p0, self.p1, self.p2, self.p3 = pattern_params(pattern)
        self.dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
        q_pos = q_pos.to(device=device, dtype=torch.long)
        k_pos = k_pos.to(device=device, dtype=torch.long)
        k_pos = k_pos[None] if k_pos.dim() == 1 else k_pos
        if k_pos.shape[-1] != sk or k_pos.shape[0] not in (1, hkv):
            raise ValueError(f"key positions {tuple(k_pos.shape)} do not fit keys {tuple(k.shape)}")
        self.cu = cu_seqlens.to(device=device, dtype=torch.long) if cu_seqlens is not None else None
        self.kpos_stride = sk if k_pos.shape[0] > 1 else 0
        heads = torch.as_tensor(heads).to(device=device, dtype=torch.long)  # no host sync
        offsets = (pattern.head_offsets(heads) if isinstance(pattern, BlockSparsePattern)
                   else torch.zeros(hq, dtype=torch.long, device=device))
        self.head_off = offsets.to(torch.int32)
        # Tile lists per KV head when keys or the pattern differ per head, else one set.
        self.per_head = k_pos.shape[0] > 1 or pattern.head_dependent
        rows = hkv if self.per_head else 1
        self.list_offsets = offsets[::self.group][:rows]
        self.q_pos_l, self.k_pos_l = q_pos, k_pos
        self.q_pos, self.k_pos = q_pos.to(torch.int32).contiguous(), k_pos.to(torch.int32).contiguous()
        if self.cu is not None:
            self.q_start = (q_pos - doc_relative(q_pos, self.cu)[1]).to(torch.int32)
            k_start = k_pos - doc_relative(torch.minimum(k_pos, self.cu[-1] - 1), self.cu)[1]
            self.k_start = torch.where(k_pos < NO_KEY, k_start, -1).to(torch.int32).contiguous()
        else:
            self.q_start, self.k_start = self.q_pos, self.k_pos  # unused

    def lists(self, block_q: int, block_k: int, transpose: bool) -> TileLists:
        states, needs_mask = tile_states(self.pattern, self.q_pos_l, self.k_pos_l, self.list_offsets,
                                         block_q, block_k, self.cu)
        return tile_lists(states, needs_mask, transpose, self.per_head)

    def consts(self, d: int, which: str) -> dict:
        t = self.tiles
        return dict(PATTERN=self.kind, HAS_DOCS=self.cu is not None, HEAD_DIM=d,
                    DOT_PREC=self.dot_prec, BLOCK_M=getattr(t, f"{which}_m"),
                    BLOCK_N=getattr(t, f"{which}_n"), **t.launch(which, d))

    def positions(self):
        return self.q_pos, self.q_start, self.k_pos, self.k_start


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def chunk_forward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens=None, tiles=None):
    """q [b, hq, sq, d], k/v [b, hkv, sk, d] -> out [b, hq, sq, d] float32, natural lse
    [b, hq, sq] float32 (-inf where no key is allowed; that row's output is 0)."""
    q, k, v = map(_last_dim_contiguous, (q, k, v))
    c = _Chunk(q, k, q_pos, k_pos, pattern, heads, scale, cu_seqlens, tiles)
    b, hq, sq, d = q.shape
    t = c.tiles
    rows = c.lists(t.fwd_m, t.fwd_n, transpose=False)
    out = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    lse2 = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
    chunk_kernels._chunk_fwd_kernel[(triton.cdiv(sq, t.fwd_m), b * hq)](
        q, k, v, out, lse2, *c.positions(), rows.entries, rows.counts, c.head_off,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        c.kpos_stride, sq, c.sk, hq, c.group, rows.row_stride, rows.entries.shape[-1],
        scale * LOG2E, c.p0, c.p1, c.p2, c.p3, **c.consts(d, "fwd"),
    )
    return out, lse2 * (1.0 / LOG2E)


def chunk_backward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens, lse, dout, delta,
                   tiles=None):
    """Gradients of this pair's share of the merged attention (``attend_backward``'s
    contract): ``lse`` (natural) and ``delta`` belong to the final output. dq [b, hq, sq, d],
    dk/dv [b, hkv, sk, d], accumulated and returned in float32."""
    q, k, v = map(_last_dim_contiguous, (q, k, v))
    dout = _last_dim_contiguous(dout.to(q.dtype))
    c = _Chunk(q, k, q_pos, k_pos, pattern, heads, scale, cu_seqlens, tiles)
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    t = c.tiles
    lse2 = (lse.float() * LOG2E).contiguous()
    delta = delta.float().contiguous()
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.empty(k.shape, device=q.device, dtype=torch.float32)
    dv = torch.empty(k.shape, device=q.device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    params = (scale, scale * LOG2E, c.p0, c.p1, c.p2, c.p3)

    cols = c.lists(t.dkdv_m, t.dkdv_n, transpose=True)
    chunk_kernels._chunk_dkdv_kernel[(triton.cdiv(c.sk, t.dkdv_n), b * hkv)](
        q, k, v, dout, dk, dv, lse2, delta, *c.positions(), cols.entries, cols.counts, c.head_off,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2),
        c.kpos_stride, sq, c.sk, hq, hkv, c.group, cols.row_stride, cols.entries.shape[-1],
        *params, **c.consts(d, "dkdv"),
    )
    rows = c.lists(t.dq_m, t.dq_n, transpose=False)
    chunk_kernels._chunk_dq_kernel[(triton.cdiv(sq, t.dq_m), b * hq)](
        q, k, v, dout, dq, lse2, delta, *c.positions(), rows.entries, rows.counts, c.head_off,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        c.kpos_stride, sq, c.sk, hq, c.group, rows.row_stride, rows.entries.shape[-1],
        *params, **c.consts(d, "dq"),
    )
    return dq, dk, dv
