"""Exact masked attention in pure torch: the test oracle and the CPU backend.

Dense scores with the pattern's token mask, computed in at least float32 (float64 stays
float64). GQA is handled by viewing query heads as [kv_heads, group] so K/V are never copied.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention with a boolean mask.

    q: [b, hq, sq, d]; k, v: [b, hkv, sk, d] with hq a multiple of hkv; mask: bool,
    broadcastable to [b, hq, sq, sk] (True = attend). Returns the output [b, hq, sq, d] in
    q's dtype and the log-sum-exp of the scaled scores [b, hq, sq] in the compute dtype
    (-inf for a row with no allowed key, whose output is 0).
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    group = hq // hkv
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).reshape(b, hkv, group, sq, d)
    scores = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.to(dtype)) * scale
    mask = mask.expand(b, hq, sq, sk).reshape(b, hkv, group, sq, sk)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0))
    out = torch.einsum("bhgqk,bhkd->bhgqd", probs, v.to(dtype))
    return out.reshape(b, hq, sq, -1).to(q.dtype), lse.reshape(b, hq, sq)


def dense_causal_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """Plain causal attention, for tests of the full layers."""
    sq, sk = q.shape[2], k.shape[2]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return masked_attention(q, k, v, mask, scale)[0]
