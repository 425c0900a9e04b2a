"""Per-chunk attention: local queries against keys at arbitrary global positions.

``attend`` (forward, returns the log-sum-exp) and ``attend_backward`` (explicit gradients
given the *final* merged output and LSE) are the only places that touch scores, so a GPU
kernel taking (q positions, k positions, pattern, heads) can replace them. Here they use the
exact pure-torch reference with a token mask built from the pattern.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_longgen.attention.patterns import Pattern, pattern_heads
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.parallel.cp.layout import doc_relative


def pair_mask(pattern: Pattern, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: torch.Tensor,
              cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool [H or 1, sq, sk]: the pattern at document-relative positions, within documents."""
    q_doc, q_rel = doc_relative(q_pos, cu_seqlens)
    k_doc, k_rel = doc_relative(k_pos, cu_seqlens)
    hs = pattern_heads(pattern, heads, len(heads)).to(q_pos.device)
    mask = pattern.allowed(q_rel[None, :, None], k_rel[None, None, :], hs[:, None, None])
    return mask & (q_doc[:, None] == k_doc[None, :])


def attend(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [b, hq, sq, d], k/v [b, hkv, sk, d] -> out [b, hq, sq, d] (q's dtype), lse [b, hq, sq]."""
    mask = pair_mask(pattern, q_pos, k_pos, heads, cu_seqlens)
    return masked_attention(q, k, v, mask[None], scale)


def attend_backward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens, lse, dout, delta):
    """Gradients of one (query chunk, key chunk) pair's share of the merged attention.

    ``lse`` is the final LSE over all keys and ``delta`` = rowsum(dout * out) of the final
    output, so p = exp(s - lse) is this pair's slice of the full softmax. Returns dq (to add to
    the chunk's dq) and dk, dv (to add to the key chunk's), all in float32.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    f32 = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(f32).reshape(b, hkv, g, sq, d)
    dog = dout.to(f32).reshape(b, hkv, g, sq, d)
    kf, vf = k.to(f32), v.to(f32)
    mask = pair_mask(pattern, q_pos, k_pos, heads, cu_seqlens)
    mask = mask[None].expand(b, hq, sq, sk).reshape(b, hkv, g, sq, sk)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kf) * scale
    lse_g = lse.reshape(b, hkv, g, sq, 1)
    p = torch.exp(s - lse_g.masked_fill(torch.isinf(lse_g), 0.0)).masked_fill(~mask, 0.0)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, dog)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", dog, vf)
    ds = p * (dp - delta.reshape(b, hkv, g, sq, 1))
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kf).reshape(b, hq, sq, d) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg) * scale
    return dq, dk, dv


def merge(out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor):
    """Combine two partial softmaxes over disjoint key sets by their LSE (rows with no key
    anywhere keep LSE -inf and output 0)."""
    new = torch.logaddexp(lse, part_lse)
    safe = new.masked_fill(torch.isinf(new), 0.0)
    w_old = torch.exp(lse - safe).unsqueeze(-1)
    w_new = torch.exp(part_lse - safe).unsqueeze(-1)
    return out * w_old + part_out.to(out.dtype) * w_new, new
