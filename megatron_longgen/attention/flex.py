"""FlexAttention backend: the pattern as a ``mask_mod``, block masks cached per layout.

The ``mask_mod`` re-states ``patterns.py``'s ``allowed`` with tensor ops (FlexAttention traces
it); tests check it against ``token_mask`` on a grid. Block masks are built with
``_compile=True`` on GPU: the uncompiled path materialises the L x L mask and runs out of
memory at 64K. FlexAttention's mask block is 128: on torch 2.11 / H100 a block of 64 fails to
compile for the backward.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch before AuxRequest: flex_attention(return_lse=True)
    AuxRequest = None

from megatron_longgen.attention.patterns import (
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    Pattern,
)

FLEX_BLOCK_SIZE = 128


def make_mask_mod(pattern: Pattern, heads: torch.Tensor, seq_len: int,
                  cu_seqlens: Optional[Tuple[int, ...]], device) -> Callable:
    """``mask_mod(b, h, q_idx, kv_idx)`` equal to ``token_mask`` (``h`` is the local head)."""
    device = torch.device(device)
    if cu_seqlens is not None:
        bounds = torch.tensor(cu_seqlens, dtype=torch.long)
        doc = torch.bucketize(torch.arange(seq_len), bounds[1:], right=True)
        doc_id, doc_start = doc.to(device), bounds[doc].to(device)
    if isinstance(pattern, BlockSparsePattern):
        offsets = pattern.head_offsets(heads).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        if cu_seqlens is None:
            q, k = q_idx, kv_idx
            ok = k <= q
        else:  # positions restart at each document; no pair crosses documents
            q, k = q_idx - doc_start[q_idx], kv_idx - doc_start[kv_idx]
            ok = (doc_id[q_idx] == doc_id[kv_idx]) & (k <= q)
        if isinstance(pattern, AttnSinkPattern):
            ok = ok & ((k < pattern.sink_tokens) | (q - k < pattern.window_size))
        elif isinstance(pattern, BlockSparsePattern):
            qb, kb = q // pattern.block_size, k // pattern.block_size
            ok = ok & ((qb - kb < pattern.local_blocks) | pattern.vertical(kb, offsets[h]))
        elif not isinstance(pattern, CausalPattern):
            raise TypeError(f"unsupported pattern {pattern!r}")
        return ok

    return mask_mod


@functools.lru_cache(maxsize=32)
def _cached_block_mask(pattern, seq_len, heads, cu_seqlens, device, block_size) -> BlockMask:
    heads_t = torch.tensor(heads, dtype=torch.long)
    mask_mod = make_mask_mod(pattern, heads_t, seq_len, cu_seqlens, device)
    num_heads = len(heads) if pattern.head_dependent else None  # None: one mask for all heads
    return create_block_mask(mask_mod, B=None, H=num_heads, Q_LEN=seq_len, KV_LEN=seq_len,
                             device=device, BLOCK_SIZE=block_size,
                             _compile=device.type == "cuda")


def block_mask_for(pattern: Pattern, seq_len: int, heads: torch.Tensor,
                   cu_seqlens: Optional[torch.Tensor], device,
                   block_size: int = FLEX_BLOCK_SIZE) -> BlockMask:
    """The block mask of ``pattern``, cached per (pattern, length, heads, documents)."""
    cu = tuple(int(x) for x in cu_seqlens.tolist()) if cu_seqlens is not None else None
    return _cached_block_mask(pattern, seq_len, tuple(int(h) for h in heads.tolist()), cu,
                              torch.device(device), block_size)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _lse_request() -> dict:
    """Flex's argument asking for the LSE: ``return_aux`` where this torch has it (the older
    ``return_lse`` is deprecated there)."""
    return {"return_aux": AuxRequest(lse=True)} if AuxRequest is not None else {"return_lse": True}


def flex_attention_backend(q, k, v, *, pattern, heads, scale, cu_seqlens=None,
                           return_lse: bool = False, block_size: int = FLEX_BLOCK_SIZE,
                           kernel_options: Optional[dict] = None):
    """``kernel_options`` go to flex_attention (``{"BACKEND": "FLASH"}``: the fa4 backend). The
    LSE (natural log) is differentiable with Flex's Triton kernels, not with FLASH."""
    block_mask = block_mask_for(pattern, q.shape[2], heads, cu_seqlens, q.device, block_size)
    # Compiled on GPU (eager Flex materialises the scores); eager elsewhere, for tests.
    fn = _compiled_flex() if q.is_cuda else flex_attention
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=True,
                  kernel_options=kernel_options)
    if not return_lse:
        return fn(q, k, v, **kwargs)
    out, lse = fn(q, k, v, **kwargs, **_lse_request())
    return out, getattr(lse, "lse", lse)  # AuxOutput.lse, or the tensor itself
