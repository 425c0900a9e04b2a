"""``sparse_attention``: the autograd wrapper around the Triton block-sparse kernels."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import triton

from megatron_longgen.attention.patterns import BlockSparsePattern, Pattern
from megatron_longgen.attention.triton_kernels import kernels
from megatron_longgen.attention.triton_kernels.layout import pattern_params, tile_lists

LOG2E = math.log2(math.e)


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of the three passes (query rows x key columns) and their launch settings
    (warps, pipeline stages) for head dim 128; smaller head dims use at most 4 warps. Key tiles of 64
    match the BlockSparse block of 64, so a vertical block costs exactly one tile. Tuned on
    H100 (docs/benchmarks.md)."""

    fwd_m: int = 128
    fwd_n: int = 64
    dkdv_m: int = 64
    dkdv_n: int = 64
    dq_m: int = 64
    dq_n: int = 64
    fwd_launch: Tuple[int, int] = (8, 3)
    dkdv_launch: Tuple[int, int] = (4, 3)
    dq_launch: Tuple[int, int] = (4, 3)

    def launch(self, which: str, head_dim: int) -> dict:
        warps, stages = getattr(self, f"{which}_launch")
        return dict(num_warps=warps if head_dim >= 128 else min(warps, 4), num_stages=stages)


DEFAULT_TILES = Tiles()
# Per-pattern tiles for bf16/fp16, from `benchmarks/attention.py --tune` (docs/benchmarks.md).
TUNED_TILES = {
    "attn_sink": Tiles(fwd_n=128, dkdv_m=32, dq_m=128, dq_launch=(8, 3)),
    "block_sparse": Tiles(fwd_m=64, fwd_launch=(4, 3), dkdv_m=32, dq_m=128, dq_launch=(8, 2)),
}
# float32 (tests): ieee float32 products run without tensor cores; 64-wide tiles spill
# registers and take a minute to compile on sm_90, 32-wide ones neither.
FP32_TILES = Tiles(fwd_m=32, fwd_n=32, dkdv_m=32, dkdv_n=32, dq_m=32, dq_n=32,
                   fwd_launch=(4, 2), dkdv_launch=(4, 2), dq_launch=(4, 2))


def default_tiles(pattern: Pattern, dtype: torch.dtype) -> Tiles:
    if dtype == torch.float32:
        return FP32_TILES
    return TUNED_TILES.get(pattern.name, DEFAULT_TILES)


def _fit_tiles(tiles: Tiles, pattern: Pattern) -> Tiles:
    """Tiles must divide or be multiples of the sparse block (``block_layout``'s rule)."""
    if not isinstance(pattern, BlockSparsePattern):
        return tiles
    b = pattern.block_size
    fit = {name: (t if t % b == 0 or b % t == 0 else min(b, t))
           for name, t in tiles.__dict__.items() if isinstance(t, int)}
    return dataclasses.replace(tiles, **fit)


def _doc_starts(cu: Tuple[int, ...], seq_len: int, device) -> torch.Tensor:
    bounds = torch.tensor(cu, dtype=torch.long)
    pos = torch.arange(seq_len)
    doc = torch.bucketize(pos, bounds[1:], right=True)
    return bounds[doc].to(device=device, dtype=torch.int32)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Setup:
    """Everything the passes share: pattern parameters, documents and head offsets."""

    def __init__(self, q, k, pattern, heads, scale, cu_seqlens, tiles):
        b, hq, s, d = q.shape
        hkv = k.shape[1]
        if hq % hkv:
            raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
        if d not in (16, 32, 64, 128):
            raise ValueError(f"head dim {d} is not supported (16, 32, 64 or 128)")
        self.heads = torch.as_tensor(heads, dtype=torch.long).cpu()
        if len(self.heads) != hq:
            raise ValueError(f"heads has {len(self.heads)} entries for {hq} query heads")
        self.pattern, self.scale, self.seq_len, self.group = pattern, scale, s, hq // hkv
        self.tiles = _fit_tiles(tiles, pattern)
        self.kind, self.p0, self.p1, self.p2, self.p3 = pattern_params(pattern)
        cu = None
        if cu_seqlens is not None:
            if b != 1:
                raise ValueError("packed documents (cu_seqlens) need batch size 1")
            cu = tuple(int(x) for x in torch.as_tensor(cu_seqlens).tolist())
            if cu[0] != 0 or cu[-1] != s or any(y < x for x, y in zip(cu[:-1], cu[1:])):
                raise ValueError(f"cu_seqlens must rise from 0 to {s}, got {list(cu)}")
            if len(cu) == 2:
                cu = None  # one document is the plain sequence
        self.cu = cu
        device = q.device
        self.doc_start = _doc_starts(cu, s, device) if cu else torch.zeros(1, dtype=torch.int32, device=device)
        offsets = (pattern.head_offsets(self.heads) if isinstance(pattern, BlockSparsePattern)
                   else torch.zeros(hq, dtype=torch.long))
        self.head_off = offsets.to(device=device, dtype=torch.int32)
        self.dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"

    def lists(self, block_q, block_k, transpose, device):
        return tile_lists(self.pattern, self.seq_len, self.heads, self.cu, block_q, block_k,
                          transpose, device)

    def common(self, lists):
        return dict(
            PATTERN=self.kind, HAS_DOCS=self.cu is not None, DOT_PREC=self.dot_prec,
        ), (int(lists.per_head), lists.counts.shape[-2], lists.entries.shape[-1])


def _forward(q, k, v, st: _Setup):
    b, hq, s, d = q.shape
    t = st.tiles
    lists = st.lists(t.fwd_m, t.fwd_n, False, q.device)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    consts, (per_head, rows, width) = st.common(lists)
    grid = (triton.cdiv(s, t.fwd_m), b * hq)
    kernels._fwd_kernel[grid](
        q, k, v, out, lse, lists.entries, lists.counts, st.head_off, st.doc_start,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        s, hq, st.group, per_head, rows, width,
        st.scale * LOG2E, st.p0, st.p1, st.p2, st.p3,
        HEAD_DIM=d, BLOCK_M=t.fwd_m, BLOCK_N=t.fwd_n, **consts, **t.launch("fwd", d),
    )
    return out, lse  # lse in base 2


def _backward(q, k, v, out, do, lse2, dlse, st: _Setup):
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    t = st.tiles
    do = _last_dim_contiguous(do)
    # dS = P * (dP - delta); a gradient on the (natural) LSE adds P * dLSE, i.e. lowers delta.
    delta = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
    dlse = dlse.float().contiguous() if dlse is not None else None
    kernels._bwd_delta_kernel[(triton.cdiv(s, 64), b * hq)](
        out, do, dlse if dlse is not None else delta, delta,
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        s, hq, HAS_DLSE=dlse is not None, HEAD_DIM=d, BLOCK_M=64,
    )
    dq = torch.empty_like(q)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))

    cols = st.lists(t.dkdv_m, t.dkdv_n, True, q.device)
    consts, (per_head, rows, width) = st.common(cols)
    kernels._bwd_dkdv_kernel[(triton.cdiv(s, t.dkdv_n), b * hkv)](
        q, k, v, do, dk, dv, lse2, delta, cols.entries, cols.counts, st.head_off, st.doc_start,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2),
        s, hq, hkv, st.group, per_head, rows, width,
        st.scale, st.scale * LOG2E, st.p0, st.p1, st.p2, st.p3,
        HEAD_DIM=d, BLOCK_M=t.dkdv_m, BLOCK_N=t.dkdv_n, **consts, **t.launch("dkdv", d),
    )
    rows_l = st.lists(t.dq_m, t.dq_n, False, q.device)
    consts, (per_head, rows, width) = st.common(rows_l)
    kernels._bwd_dq_kernel[(triton.cdiv(s, t.dq_m), b * hq)](
        q, k, v, do, dq, lse2, delta, rows_l.entries, rows_l.counts, st.head_off, st.doc_start,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        s, hq, st.group, per_head, rows, width,
        st.scale, st.scale * LOG2E, st.p0, st.p1, st.p2, st.p3,
        HEAD_DIM=d, BLOCK_M=t.dq_m, BLOCK_N=t.dq_n, **consts, **t.launch("dq", d),
    )
    return dq, dk, dv


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup):
        q, k, v = map(_last_dim_contiguous, (q, k, v))
        out, lse2 = _forward(q, k, v, setup)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.setup = setup
        ctx.set_materialize_grads(False)  # an unused LSE gets no zero gradient tensor
        return out, lse2 * (1.0 / LOG2E)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse2 = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, dout, lse2, dlse, ctx.setup)
        return dq, dk, dv, None


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    heads: Union[torch.Tensor, None],
    scale: float,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    tiles: Optional[Tiles] = None,
):
    """Block-sparse attention of ``pattern``: q [b, hq, s, d], k/v [b, hkv, s, d].

    ``heads`` are the global indices of the local query heads (None: all heads, from 0).
    Returns out [b, hq, s, d], and with ``return_lse`` also the natural log-sum-exp of the
    scaled scores [b, hq, s] in float32; both are differentiable. ``tiles`` default to
    ``default_tiles(pattern, q.dtype)``.
    """
    if heads is None:
        heads = torch.arange(q.shape[1])
    setup = _Setup(q, k, pattern, heads, scale, cu_seqlens, tiles or default_tiles(pattern, q.dtype))
    out, lse = _SparseAttention.apply(q, k, v, setup)
    return (out, lse) if return_lse else out
