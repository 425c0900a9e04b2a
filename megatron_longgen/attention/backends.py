"""Attention backends behind LongGenCoreAttention, and how ``auto`` chooses among them.

Each backend is ``fn(q, k, v, *, pattern, heads, scale, cu_seqlens) -> out`` with q
[b, hq, s, d], k/v [b, hkv, s, d] (GQA not expanded), ``heads`` the global indices of the
local query heads, and out [b, hq, s, d]. ``supports(pattern, device)`` says where it applies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_longgen.attention.patterns import CausalPattern, Pattern, token_mask
from megatron_longgen.attention.reference import masked_attention


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    supports: Callable[[Pattern, torch.device], bool]


_BACKENDS: Dict[str, Backend] = {}

# Preference order of ``auto``: the first backend that is registered and supports the
# pattern on the device wins. On CPU: SDPA for full layers, else the exact reference.
_AUTO_ORDER_CPU = ["sdpa", "reference"]

# On cuda, per pattern, measured on H100 (docs/benchmarks.md, "Attention kernels"):
# causal: SDPA 1.8x faster than our kernel; AttnSink: Flex and ours within 1.3% at 128K
# (Flex ahead); BlockSparse: ours 2.2x faster than Flex (Flex's mask block of 128 reads whole
# 128-blocks).
_AUTO_ORDER_CUDA = {
    "causal": ["sdpa", "triton", "flex", "reference"],
    "attn_sink": ["flex", "triton", "reference"],
    "block_sparse": ["triton", "flex", "reference"],
}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def resolve_backend(name: str, pattern: Pattern, device: torch.device) -> Backend:
    """The backend ``name`` (or the one ``auto`` picks) for ``pattern`` on ``device``."""
    device = torch.device(device)
    if name == "auto":
        order = _AUTO_ORDER_CUDA[pattern.name] if device.type == "cuda" else _AUTO_ORDER_CPU
        for candidate in order:
            backend = _BACKENDS.get(candidate)
            if backend is not None and backend.supports(pattern, device):
                return backend
        raise RuntimeError(f"no attention backend supports {pattern} on {device}")
    if name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available here; have {available_backends()}")
    backend = _BACKENDS[name]
    if not backend.supports(pattern, device):
        raise ValueError(f"attention backend {name!r} does not support {pattern} on {device.type}")
    return backend


@functools.lru_cache(maxsize=16)
def _cached_mask(pattern, seq_len, heads, cu_seqlens, num_heads, device) -> torch.Tensor:
    cu = torch.tensor(cu_seqlens) if cu_seqlens is not None else None
    return token_mask(pattern, seq_len, heads, cu, num_heads=num_heads).to(device)


def pattern_mask(pattern: Pattern, seq_len: int, heads: torch.Tensor,
                 cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """Token mask [H or 1, L, L] for the local heads, cached per (pattern, length, heads)."""
    cu = tuple(int(x) for x in cu_seqlens.tolist()) if cu_seqlens is not None else None
    return _cached_mask(pattern, seq_len, tuple(int(h) for h in heads.tolist()), cu,
                        len(heads), torch.device(device))


def reference_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None):
    mask = pattern_mask(pattern, q.shape[2], heads, cu_seqlens, q.device)
    return masked_attention(q, k, v, mask[None], scale)[0]


def sdpa_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None):
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if q.is_cuda and "triton" in _BACKENDS:
        # SDPA has no variable-length path; a dense L x L mask would not fit at long lengths.
        return _BACKENDS["triton"].fn(q, k, v, pattern=pattern, heads=heads, scale=scale,
                                      cu_seqlens=cu_seqlens)
    mask = pattern_mask(pattern, q.shape[2], heads, cu_seqlens, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale, enable_gqa=True)


register_backend(Backend("reference", reference_attention, lambda pattern, device: True))
register_backend(Backend(
    "sdpa", sdpa_attention, lambda pattern, device: isinstance(pattern, CausalPattern)))


def _cuda_only(pattern, device) -> bool:
    return torch.device(device).type == "cuda"


def _register_gpu_backends() -> None:
    """Flex and our Triton kernels, where this torch build has them (cuda only: the Triton
    kernels run on CPU only under TRITON_INTERPRET=1, for tests)."""
    try:
        from megatron_longgen.attention.flex import flex_attention_backend
    except ImportError:
        pass
    else:
        register_backend(Backend("flex", flex_attention_backend, _cuda_only))
    try:
        from megatron_longgen.attention.triton_kernels import sparse_attention
    except ImportError:
        return

    def triton_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None):
        return sparse_attention(q, k, v, pattern, heads, scale, cu_seqlens=cu_seqlens)

    register_backend(Backend("triton", triton_attention, _cuda_only))


_register_gpu_backends()
