"""Attention backends behind LongGenCoreAttention, and how ``auto`` chooses among them.

Each backend is ``fn(q, k, v, *, pattern, heads, scale, cu_seqlens=None, return_lse=False)``
with q [b, hq, s, d], k/v [b, hkv, s, d] (GQA not expanded), ``heads`` the global indices of
the local query heads; it returns out [b, hq, s, d], and with ``return_lse`` the pair
(out, lse): lse [b, hq, s] float32 (float64 for float64 inputs), the natural log-sum-exp of
the scaled scores over the allowed keys. ``supports(pattern, device)`` says where it applies.

Gradient through the LSE (context parallelism merges partial results with it): reference,
triton, flex (its Triton kernels) and fa4 on causal layers carry it. Two have none and raise
when a loss depends on the LSE: fa4 on AttnSink (torch's FLASH backend of Flex) and sdpa.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from megatron_longgen.attention import fa4
from megatron_longgen.attention.patterns import CausalPattern, Pattern, token_mask
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.utils.cli import fail, is_rank_zero

log = logging.getLogger("megatron_longgen.attention")


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[..., torch.Tensor]
    supports: Callable[[Pattern, torch.device], bool]


_BACKENDS: Dict[str, Backend] = {}

# Preference order of ``auto``: the first backend that is registered and supports the
# pattern on the device wins. On CPU: SDPA for full layers, else the exact reference.
_AUTO_ORDER_CPU = ["sdpa", "reference"]

# On cuda, per pattern (docs/benchmarks.md, "Attention kernels"), fwd+bwd at 128K: causal:
# FA4 784 ms, SDPA 904 ms, our kernel 1.8x slower than SDPA; AttnSink: FA4 through Flex's
# FLASH backend 61.3 ms, Flex (Triton) 96.7, ours 99.8; BlockSparse: ours 194.6 ms, Flex
# FLASH 384.6, Flex 2.2x slower than ours (its mask block of 128 reads whole 128-blocks).
_AUTO_ORDER_CUDA = {
    "causal": ["fa4", "sdpa", "triton", "flex", "reference"],
    "attn_sink": ["fa4", "flex", "triton", "reference"],
    "block_sparse": ["triton", "flex", "reference"],
}

# Backends that need a package this install may lack: the package, for the error and the log.
_OPTIONAL_PACKAGES = {"fa4": fa4.FA4_PACKAGE}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def available_backends() -> Tuple[str, ...]:
    return tuple(_BACKENDS)


def resolve_backend(name: str, pattern: Pattern, device: torch.device) -> Backend:
    """The backend ``name`` (or the one ``auto`` picks) for ``pattern`` on ``device``."""
    device = torch.device(device)
    if name == "auto":
        return _auto_backend(pattern, device)
    if name not in _BACKENDS:
        if name in _OPTIONAL_PACKAGES:
            package = _OPTIONAL_PACKAGES[name]
            fail(f"--core-attention-backend {name} needs the {package} package, which is not "
                 f"installed: pip install {package} (on an sm90+ GPU), or use auto")
        fail(f"attention backend {name!r} is not available here; have {available_backends()}")
    backend = _BACKENDS[name]
    if not backend.supports(pattern, device):
        fail(f"attention backend {name!r} does not support {pattern} on {device.type}")
    return backend


def _auto_backend(pattern: Pattern, device: torch.device, skip: Tuple[str, ...] = ()) -> Backend:
    order = _AUTO_ORDER_CUDA[pattern.name] if device.type == "cuda" else _AUTO_ORDER_CPU
    missing = []
    for candidate in order:
        if candidate in skip:
            continue
        backend = _BACKENDS.get(candidate)
        if backend is None and candidate in _OPTIONAL_PACKAGES:
            missing.append(candidate)
        elif backend is not None and backend.supports(pattern, device):
            for name in missing:
                _log_missing_once(name, pattern.name, backend.name)
            return backend
    raise RuntimeError(f"no attention backend supports {pattern} on {device}")


@functools.lru_cache(maxsize=None)
def _log_missing_once(name: str, pattern_name: str, fallback: str) -> None:
    if is_rank_zero():
        package = _OPTIONAL_PACKAGES[name]
        log.warning("%s not installed: %s attention uses %s; pip install %s",
                    package, pattern_name, fallback, package)


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


def reference_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None, return_lse=False):
    mask = pattern_mask(pattern, q.shape[2], heads, cu_seqlens, q.device)
    out, lse = masked_attention(q, k, v, mask[None], scale)
    return (out, lse) if return_lse else out


def sdpa_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None, return_lse=False):
    lse_in_16_bits = q.dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and "triton" in _BACKENDS and (
            cu_seqlens is not None or (return_lse and not lse_in_16_bits)):
        # SDPA has no variable-length path (a dense L x L mask would not fit at long lengths),
        # and its CUDA kernel that returns the LSE runs 16 bits only.
        return _BACKENDS["triton"].fn(q, k, v, pattern=pattern, heads=heads, scale=scale,
                                      cu_seqlens=cu_seqlens, return_lse=return_lse)
    mask = None
    if cu_seqlens is not None:
        mask = pattern_mask(pattern, q.shape[2], heads, cu_seqlens, q.device)[None]
    if return_lse:
        out, lse = _sdpa_with_lse(q, k, v, mask, scale)
        return out, _NoGradLSE.apply(lse, q)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _sdpa_with_lse(q, k, v, mask: Optional[torch.Tensor], scale: float):
    """SDPA's flash kernels, which return the LSE (F.scaled_dot_product_attention does not);
    both take GQA without expanding K/V. On CPU documents come as an additive mask; on CUDA
    (16 bits, dense causal) they never reach here."""
    if q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)[:2]
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, mask is None, attn_mask=bias, scale=scale)


class _NoGradLSE(torch.autograd.Function):
    """SDPA's LSE has no gradient: one reaching it is an error, not silently dropped."""

    @staticmethod
    def forward(ctx, lse, q):
        ctx.set_materialize_grads(False)
        return lse.clone()

    @staticmethod
    def backward(ctx, grad_lse):
        if grad_lse is not None:
            raise RuntimeError("the sdpa backend's LSE has no gradient; use the triton, fa4 or "
                               "reference backend to backpropagate through the LSE")
        return None, None


register_backend(Backend("reference", reference_attention, lambda pattern, device: True))
register_backend(Backend(
    "sdpa", sdpa_attention, lambda pattern, device: isinstance(pattern, CausalPattern)))


# ---- context parallelism's chunk kernels (parallel/cp/compute.py's attend / attend_backward)


@dataclass(frozen=True)
class _PairKernel:
    """A CP pair kernel: its name, forward, backward and ``supports(device, dtype, head_dim)``."""

    name: str
    forward: Callable
    backward: Callable
    supports: Callable[[torch.device, torch.dtype, int], bool]


@dataclass(frozen=True)
class ChunkBackend(_PairKernel):
    """Attention of one CP chunk pair with keys at explicit global positions.

    ``forward(q, k, v, q_pos, k_pos, pattern, heads, scale, cu_seqlens)`` -> (out float32, lse
    natural); ``backward(..., cu_seqlens, lse, dout, delta)`` -> (dq, dk, dv) float32, given the
    final merged output's LSE and delta. ``supports(device, dtype, head_dim)``. Kernels that only
    take one contiguous key block (FA4, SDPA's flash op, for ring steps) are ``DensePairBackend``.
    """


_CHUNK_BACKENDS: Dict[str, ChunkBackend] = {}
# Forces a chunk backend by name (tests run "triton" on CPU under TRITON_INTERPRET=1).
CHUNK_BACKEND_ENV = "LONGGEN_CP_CHUNK_BACKEND"
_CHUNK_AUTO_ORDER = {"cuda": ["triton", "reference"], "cpu": ["reference"]}


def register_chunk_backend(backend: ChunkBackend) -> None:
    _CHUNK_BACKENDS[backend.name] = backend


def _forced_kernel(env: str, name: str, registry: dict, device: torch.device, dtype: torch.dtype,
                   head_dim: int, choices: Tuple[str, ...]):
    """The kernel that ``$env=name`` forces, or a one-line error naming the choices."""
    if name not in registry and name in _OPTIONAL_PACKAGES:
        fail(f"{env}={name} needs the {_OPTIONAL_PACKAGES[name]} package, which is not installed; "
             f"use one of {choices}, or unset it")
    backend = registry.get(name)
    if backend is None or not backend.supports(device, dtype, head_dim):
        fail(f"{env}={name}: no such context-parallel kernel for {dtype}, head dim {head_dim} on "
             f"{device.type}; have {choices}, or unset it")
    return backend


def chunk_backend(device: torch.device, dtype: torch.dtype, head_dim: int) -> ChunkBackend:
    """The chunk backend for queries on ``device`` of ``dtype`` and ``head_dim``:
    $LONGGEN_CP_CHUNK_BACKEND if set, else the first of the device's order that supports them."""
    device = torch.device(device)
    forced = os.environ.get(CHUNK_BACKEND_ENV)
    if forced:
        return _forced_kernel(CHUNK_BACKEND_ENV, forced, _CHUNK_BACKENDS, device, dtype, head_dim,
                              tuple(_CHUNK_BACKENDS))
    for name in _CHUNK_AUTO_ORDER.get(device.type, ["reference"]):
        backend = _CHUNK_BACKENDS.get(name)
        if backend is not None and backend.supports(device, dtype, head_dim):
            return backend
    raise RuntimeError(f"no context-parallel chunk backend for {dtype}, head dim {head_dim} on {device}")


@dataclass(frozen=True)
class DensePairBackend(_PairKernel):
    """A ring step's pair whose keys are one contiguous block, no documents: the causal diagonal
    (``causal``: queries and keys at the same positions, sq == sk) or fully visible.

    q [b, hq, sq, d], k/v [b, hkv, sk, d] (GQA not expanded). ``forward(q, k, v, scale, causal)``
    -> (out [b, hq, sq, d] in float32 or q's dtype, lse [b, hq, sq] natural, float32 or
    float64); ``backward(q, k, v, out, lse, dout, scale, causal)`` -> (dq, dk, dv) of the pair's
    share given the FINAL merged ``out`` (q's dtype or float32) and ``lse``: p = exp(s - lse) is
    this pair's slice of the whole softmax. Gradients come in q's dtype or float32 (each
    backend says which); the ring adds them into float32 accumulators.
    ``supports(device, dtype, head_dim)``.

    ``window``: the backend also takes ``window=w`` with ``causal`` (the AttnSink exchange's
    sliding window): query i sits at key i + sk - sq (bottom-right aligned, sk >= sq) and reads
    the ``w`` keys ending there.
    """

    window: bool = False


_DENSE_PAIR_BACKENDS: Dict[str, DensePairBackend] = {}
# Forces the kernel of ring steps: a dense-pair backend (fa4, sdpa, dense_reference) or a chunk
# backend (triton, reference: every pair through compute.attend with that backend).
RING_BACKEND_ENV = "LONGGEN_CP_RING_BACKEND"
# On CUDA, causal fwd+bwd at 128K (docs/benchmarks.md): FA4 784 ms, SDPA 904 ms, ours 1.8x SDPA.
# On CPU ring pairs stay on the chunk reference (the dense one is for tests, forced).
_DENSE_PAIR_AUTO_ORDER = {"cuda": ["fa4", "sdpa"]}


def register_dense_pair_backend(backend: DensePairBackend) -> None:
    _DENSE_PAIR_BACKENDS[backend.name] = backend


def ring_backend_names() -> Tuple[str, ...]:
    """Names $LONGGEN_CP_RING_BACKEND takes."""
    return tuple(_DENSE_PAIR_BACKENDS) + tuple(_CHUNK_BACKENDS)


def ring_pair_backend(device: torch.device, dtype: torch.dtype, head_dim: int,
                      dense_layer: bool) -> Union[DensePairBackend, ChunkBackend]:
    """The kernel of a ring step's pairs. ``dense_layer``: causal with no packed documents (the
    only layers a dense-pair backend serves; others always take a chunk backend).
    $LONGGEN_CP_RING_BACKEND if set; else, with $LONGGEN_CP_CHUNK_BACKEND set, that chunk
    backend; else the first dense-pair backend of the device's order that supports the inputs;
    else ``chunk_backend``'s choice."""
    device = torch.device(device)
    forced = os.environ.get(RING_BACKEND_ENV)
    if forced:
        kernels = {**_CHUNK_BACKENDS, **_DENSE_PAIR_BACKENDS}
        backend = _forced_kernel(RING_BACKEND_ENV, forced, kernels, device, dtype, head_dim,
                                 ring_backend_names())
        # Packed documents: the chunk kernels mask them.
        if isinstance(backend, DensePairBackend) and not dense_layer:
            return chunk_backend(device, dtype, head_dim)
        return backend
    if dense_layer and not os.environ.get(CHUNK_BACKEND_ENV):
        for name in _DENSE_PAIR_AUTO_ORDER.get(device.type, []):
            backend = _DENSE_PAIR_BACKENDS.get(name)
            if backend is not None and backend.supports(device, dtype, head_dim):
                return backend
    return chunk_backend(device, dtype, head_dim)


# Forces the AttnSink exchange's kernel: a dense-pair backend that takes a window (fa4,
# dense_reference), or "chunk": the compact chunk path (with $LONGGEN_CP_CHUNK_BACKEND's kernel).
EXCHANGE_BACKEND_ENV = "LONGGEN_CP_EXCHANGE_BACKEND"
EXCHANGE_CHUNK_PATH = "chunk"
# On CUDA: FA4's sliding window (fwd+bwd at 128K: 56.3 ms vs Flex FLASH with sinks 61.3 ms; our
# chunk kernel on the compact layout ran 2.5x its ideal share at CP 8, docs/context_parallel.md).
_WINDOW_PAIR_AUTO_ORDER = {"cuda": ["fa4"]}


def exchange_backend_names() -> Tuple[str, ...]:
    """Names $LONGGEN_CP_EXCHANGE_BACKEND takes."""
    return tuple(n for n, b in _DENSE_PAIR_BACKENDS.items() if b.window) + (EXCHANGE_CHUNK_PATH,)


def exchange_pair_backend(device: torch.device, dtype: torch.dtype,
                          head_dim: int) -> Optional[DensePairBackend]:
    """The window-capable dense-pair backend of an AttnSink exchange without packed documents,
    or None for the compact chunk path. $LONGGEN_CP_EXCHANGE_BACKEND if set; else None when
    $LONGGEN_CP_CHUNK_BACKEND is set; else the first of the device's order that supports the
    inputs (None on CPU)."""
    device = torch.device(device)
    forced = os.environ.get(EXCHANGE_BACKEND_ENV)
    if forced == EXCHANGE_CHUNK_PATH:
        return None
    windowed = {n: b for n, b in _DENSE_PAIR_BACKENDS.items() if b.window}
    if forced:
        return _forced_kernel(EXCHANGE_BACKEND_ENV, forced, windowed, device, dtype, head_dim,
                              exchange_backend_names())
    if os.environ.get(CHUNK_BACKEND_ENV):
        return None
    for name in _WINDOW_PAIR_AUTO_ORDER.get(device.type, []):
        backend = windowed.get(name)
        if backend is not None and backend.supports(device, dtype, head_dim):
            return backend
    return None


def _cuda_only(pattern, device) -> bool:
    return torch.device(device).type == "cuda"


def _register_gpu_backends() -> None:
    """Flex, our Triton kernels and flash-attn-4, where this install has them (cuda only: the
    Triton kernels run on CPU only under TRITON_INTERPRET=1, for tests)."""
    try:
        from megatron_longgen.attention.flex import flex_attention_backend
    except ImportError:
        pass
    else:
        register_backend(Backend("flex", flex_attention_backend, _cuda_only))
    if fa4.fa4_installed():
        register_backend(Backend("fa4", fa4_attention, fa4.supports))
    try:
        from megatron_longgen.attention.triton_kernels import sparse_attention
    except ImportError:
        return

    def triton_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None, return_lse=False):
        return sparse_attention(q, k, v, pattern, heads, scale, cu_seqlens=cu_seqlens,
                                return_lse=return_lse)

    register_backend(Backend("triton", triton_attention, _cuda_only))


def fa4_attention(q, k, v, **kwargs):
    """flash-attn-4 runs 16 bits only: float32 takes the backend ``auto`` picks after fa4."""
    if q.dtype in fa4.FA4_DTYPES:
        return fa4.fa4_attention(q, k, v, **kwargs)
    return _auto_backend(kwargs["pattern"], q.device, skip=("fa4",)).fn(q, k, v, **kwargs)


_register_gpu_backends()
