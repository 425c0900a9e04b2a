"""Per-chunk attention: local queries against keys at arbitrary global positions.

``attend`` (forward, returns the log-sum-exp) and ``attend_backward`` (explicit gradients
given the *final* merged output and LSE) are the only places that touch scores. Which kernel
runs is the chunk backend registry's choice (``attention/backends.py``): on CUDA the Triton
flash kernels of ``triton_chunk.py`` (bf16/fp16/fp32), on CPU the exact pure-torch reference
below, which builds a token mask of the pair (small sizes only). ``$LONGGEN_CP_CHUNK_BACKEND``
forces one (tests run ``triton`` on CPU under ``TRITON_INTERPRET=1``).

Key positions are [sk] (shared by the KV heads: a ring step's chunk) or [hkv, sk] (a row list
per KV head: the exchange's compact layout); a slot at position ``NO_KEY`` is padding.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_longgen.attention.backends import ChunkBackend, chunk_backend, register_chunk_backend
from megatron_longgen.attention.patterns import Pattern, pattern_heads
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.parallel.cp.layout import doc_relative

NO_KEY = 1 << 30  # position of a padding key slot (beyond any sequence): never attended


def pair_mask(pattern: Pattern, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: torch.Tensor,
              cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool [H or 1, sq, sk]: the pattern at document-relative positions, within documents."""
    k_pos = k_pos if k_pos.dim() == 2 else k_pos[None]
    q_doc, q_rel = doc_relative(q_pos, cu_seqlens)
    k_doc, k_rel = doc_relative(k_pos, cu_seqlens)  # NO_KEY: past the last document
    hs = pattern_heads(pattern, heads, len(heads)).to(q_pos.device)
    if k_pos.shape[0] > 1:  # keys per KV head: one mask per query head
        group = len(heads) // k_pos.shape[0]
        k_doc, k_rel = k_doc.repeat_interleave(group, 0), k_rel.repeat_interleave(group, 0)
        hs = hs.expand(len(heads))
    mask = pattern.allowed(q_rel[None, :, None], k_rel[:, None, :], hs[:, None, None])
    return mask & (q_doc[None, :, None] == k_doc[:, None, :])


def attend(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens=None,
           backend: Optional[ChunkBackend] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [b, hq, sq, d], k/v [b, hkv, sk, d] -> out [b, hq, sq, d] in float32 (float64 for
    float64 inputs), natural lse [b, hq, sq] (-inf where no key is allowed; output 0).
    ``backend``: the chunk backend to run (default: the registry's choice)."""
    backend = backend or chunk_backend(q.device, q.dtype, q.shape[-1])
    return backend.forward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens)


def attend_backward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens, lse, dout, delta,
                    backend: Optional[ChunkBackend] = None):
    """Gradients of one (query chunk, key chunk) pair's share of the merged attention.

    ``lse`` is the final LSE over all keys and ``delta`` = rowsum(dout * out) of the final
    output, so p = exp(s - lse) is this pair's slice of the full softmax. Returns dq (to add to
    the chunk's dq) and dk, dv (to add to the key chunk's), all in float32 (or float64).
    """
    backend = backend or chunk_backend(q.device, q.dtype, q.shape[-1])
    return backend.backward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens, lse, dout, delta)


# ---------------------------------------------------------------- the exact reference

def _reference_forward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens=None):
    mask = pair_mask(pattern, q_pos, k_pos, heads, cu_seqlens)
    out, lse = masked_attention(q, k, v, mask[None], scale)
    return out.to(lse.dtype), lse


def _reference_backward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens, lse, dout, delta):
    mask = pair_mask(pattern, q_pos, k_pos, heads, cu_seqlens)
    return masked_backward(q, k, v, mask, scale, lse, dout, delta)


def masked_backward(q, k, v, mask, scale, lse, dout, delta):
    """Exact gradients of a pair's share given the final ``lse`` and ``delta``; ``mask`` bool
    [H or 1, sq, sk]. Float32 (float64 for float64 inputs)."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    f32 = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(f32).reshape(b, hkv, g, sq, d)
    dog = dout.to(f32).reshape(b, hkv, g, sq, d)
    kf, vf = k.to(f32), v.to(f32)
    mask = mask[None].expand(b, hq, sq, sk).reshape(b, hkv, g, sq, sk)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kf) * scale
    lse_g = lse.to(f32).reshape(b, hkv, g, sq, 1)
    p = torch.exp(s - lse_g.masked_fill(torch.isinf(lse_g), 0.0)).masked_fill(~mask, 0.0)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, dog)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", dog, vf)
    ds = p * (dp - delta.to(f32).reshape(b, hkv, g, sq, 1))
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kf).reshape(b, hq, sq, d) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg) * scale
    return dq, dk, dv


register_chunk_backend(ChunkBackend("reference", _reference_forward, _reference_backward,
                                    lambda device, dtype, head_dim: True))


def _register_triton() -> None:
    try:
        import triton  # noqa: F401

        from megatron_longgen.attention.triton_kernels.kernels import INTERPRET
        from megatron_longgen.parallel.cp.triton_chunk import HEAD_DIMS, chunk_backward, chunk_forward
    except ImportError:
        return

    def supports(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        return (dtype in (torch.bfloat16, torch.float16, torch.float32) and head_dim in HEAD_DIMS
                and (device.type == "cuda" or INTERPRET))

    register_chunk_backend(ChunkBackend("triton", chunk_forward, chunk_backward, supports))


_register_triton()


# ---------------------------------------------------------------- one pair as a layer

class ChunkAttention(torch.autograd.Function):
    """``attend`` whose gradient is ``attend_backward``: one pair holding every key its
    queries read (the exchange's local plus received keys), so its LSE is the final one."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens):
        out, lse = attend(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (q_pos, k_pos, pattern, heads, scale, cu_seqlens)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        delta = (dout.to(out.dtype) * out).sum(-1)
        dq, dk, dv = attend_backward(q, k, v, *ctx.args, lse, dout, delta)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def chunk_attention(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens=None) -> torch.Tensor:
    return ChunkAttention.apply(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens)


def merge(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor):
    """Combine two partial softmaxes over disjoint key sets by their LSE (rows with no key
    anywhere keep LSE -inf and output 0)."""
    new = torch.logaddexp(lse, part_lse)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    w_old = torch.exp(lse - safe).unsqueeze(-1)
    w_new = torch.exp(part_lse - safe).unsqueeze(-1)
    return out * w_old + part_out.to(out.dtype) * w_new, new
