"""flash-attn-4 backends: optional, found at run time, CUDA sm90+ only.

flash-attn-4 (PyPI ``flash-attn-4``, module ``flash_attn.cute``) is FlashAttention written in
the CuTe DSL. This module follows the API of flash-attn-4 4.0.0b36 (the keywords used here are
the same since 4.0.0b4):

- ``flash_attn_func(q, k, v, softmax_scale=, causal=, return_lse=)``: q [b, s, hq, d],
  k/v [b, s, hkv, d] with hkv dividing hq (GQA without expanding K/V), fp16 or bf16.
- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=,
  max_seqlen_k=, softmax_scale=, causal=, return_lse=)``: q [total, hq, d], cu_seqlens int32.
- Both return ``(out, lse)``: out in q's layout, lse float32, natural log, [b, hq, s]
  ([hq, total] for varlen); the LSE is differentiable.

Per pattern (one H200, 128K, 32 query / 8 KV heads, d 128, bf16, fwd+bwd; docs/benchmarks.md):

- causal: FA4 itself (784 ms vs SDPA 904 ms); packed documents through the varlen entry.
- attn_sink: torch's FlexAttention with ``kernel_options={"BACKEND": "FLASH"}``, which runs FA4
  with the pattern's ``mask_mod`` and block mask (``flex.py``'s, blocks of 128): 61.3 ms vs
  our Triton kernel's 99.8 ms. FA4's own ``window_size`` has no sink tokens (56.3 ms without
  them), and its ``learnable_sink`` is a per-head softmax-offset logit, not sink tokens.
- block_sparse: not served. Our Triton kernel is 2x faster (194.6 vs 384.6 ms: the FLASH
  backend reads whole 128-blocks, and 64-token mask blocks have no FLASH backward).

The log-sum-exp is differentiable for causal; for attn_sink torch raises NotImplementedError
when a loss depends on the LSE of the FLASH backend.

Context parallelism's ring steps (``pair_forward`` / ``pair_backward``) call the interface's
low-level functions, whose backward takes the output and LSE explicitly (the final merged
ones): ``flash_attn.cute.interface._flash_attn_fwd(q, k, v, softmax_scale=, causal=,
return_lse=)`` -> (out, lse, ...) and ``_flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale,
causal)`` -> (dq, dk, dv, ...), same layouts; out, dout and the gradients in q's dtype.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Optional, Tuple

import torch

from megatron_longgen.attention.patterns import AttnSinkPattern, CausalPattern, Pattern

FA4_PACKAGE = "flash-attn-4"
FA4_DTYPES = (torch.float16, torch.bfloat16)
_MIN_CAPABILITY = (9, 0)  # Hopper and newer
_FLASH_OPTIONS = {"BACKEND": "FLASH"}


@functools.lru_cache(maxsize=1)
def fa4_installed() -> bool:
    """Whether ``flash_attn.cute`` is installed. Found without importing it: the CuTe DSL
    takes seconds to load, so the kernels import it on first use."""
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, OSError, ValueError):  # no parent ``flash_attn``, or a broken one
        return False


def _capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) of a CUDA device; (0, 0) where this torch has no CUDA."""
    if not torch.cuda.is_available():
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def _flex_has_flash_backend() -> bool:
    """Whether this torch's FlexAttention takes ``kernel_options["BACKEND"]`` (FLASH)."""
    from torch.nn.attention import flex_attention

    options = getattr(flex_attention, "FlexKernelOptions", None)
    return options is not None and "BACKEND" in getattr(options, "__annotations__", {})


@functools.lru_cache(maxsize=1)
def fa4_loads() -> bool:
    """Whether ``flash_attn.cute`` imports (once, on the first CUDA use): an install whose CuTe
    DSL libraries are incomplete is found by ``fa4_installed`` but fails here, and then counts
    as missing, with one log line saying why."""
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as err:  # the DSL raises RuntimeError / ImportError / OSError
        logging.getLogger(__name__).warning(
            "%s is installed but does not load (%s); using the next backend", FA4_PACKAGE,
            " ".join(str(err).split())[:200])
        return False
    return True


def supports(pattern: Pattern, device) -> bool:
    device = torch.device(device)
    if device.type != "cuda" or _capability(device) < _MIN_CAPABILITY or not fa4_loads():
        return False
    if isinstance(pattern, CausalPattern):
        return True
    return isinstance(pattern, AttnSinkPattern) and _flex_has_flash_backend()


def _host_bounds(cu_seqlens: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(x) for x in cu_seqlens.tolist())  # one host read, as for our Triton kernel


def _causal(q, k, v, scale: float, cu_seqlens: Optional[torch.Tensor], return_lse: bool):
    """FA4 causal: (out [b, hq, s, d], lse [b, hq, s] or None). Ours is [b, h, s, d], FA4's is
    [b, s, h, d]: a transposed view, no copy (Megatron's layout has unit stride in d)."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    bounds = _host_bounds(cu_seqlens) if cu_seqlens is not None else None
    if bounds is None or len(bounds) == 2:  # one document is the plain sequence
        out, lse = flash_attn_func(qt, kt, vt, softmax_scale=scale, causal=True,
                                   return_lse=return_lse)
        return out.transpose(1, 2), lse
    if q.shape[0] != 1:
        raise ValueError("packed documents (cu_seqlens) need batch size 1")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    out, lse = flash_attn_varlen_func(
        qt[0], kt[0], vt[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
        max_seqlen_k=longest, softmax_scale=scale, causal=True, return_lse=return_lse)
    # [total, h, d] -> [1, h, total, d]; lse [h, total] -> [1, h, total]
    return out.transpose(0, 1)[None], (lse[None] if lse is not None else None)


def fa4_attention(q, k, v, *, pattern, heads, scale, cu_seqlens=None, return_lse=False):
    """The backend function (``backends.py``'s interface); q/k/v in fp16 or bf16."""
    if q.dtype not in FA4_DTYPES:
        raise ValueError(f"{FA4_PACKAGE} runs fp16 or bf16, got {q.dtype}")
    if isinstance(pattern, CausalPattern):
        out, lse = _causal(q, k, v, scale, cu_seqlens, return_lse)
        return (out, lse) if return_lse else out
    if isinstance(pattern, AttnSinkPattern):
        from megatron_longgen.attention.flex import flex_attention_backend

        # FLASH's backward takes no gradient of the LSE, and a compiled graph that returns the
        # LSE hands it one: an LSE under autograd runs Flex's Triton template instead.
        lse_under_grad = return_lse and torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v))
        return flex_attention_backend(q, k, v, pattern=pattern, heads=heads, scale=scale,
                                      cu_seqlens=cu_seqlens, return_lse=return_lse,
                                      kernel_options=None if lse_under_grad else _FLASH_OPTIONS)
    raise ValueError(f"the fa4 backend does not serve {pattern}")


# ---------------------------------------------------------------- context-parallel ring pairs

PAIR_HEAD_DIMS = range(8, 129, 8)  # what sm90 and sm100 both take


def pair_supports(device, dtype: torch.dtype, head_dim: int) -> bool:
    device = torch.device(device)
    return (device.type == "cuda" and dtype in FA4_DTYPES and head_dim in PAIR_HEAD_DIMS
            and _capability(device) >= _MIN_CAPABILITY and fa4_loads())


def _window_sizes(window: Optional[int]) -> dict:
    """FA4's (left, right) window: ``window`` keys ending at the query's aligned key."""
    return {} if window is None else {"window_size_left": window - 1, "window_size_right": 0}


def pair_forward(q, k, v, scale: float, causal: bool, window: Optional[int] = None):
    """One dense pair: q [b, hq, sq, d], k/v [b, hkv, sk, d] (transposed views, no copy)
    -> out [b, hq, sq, d] in q's dtype, lse [b, hq, sq] float32 natural. ``window`` (with
    ``causal``): query i reads the ``window`` keys ending at key i + sk - sq (FA4 aligns causal
    masks bottom-right)."""
    from flash_attn.cute.interface import _flash_attn_fwd

    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out, lse = _flash_attn_fwd(qt, kt, vt, softmax_scale=scale, causal=causal, return_lse=True,
                               **_window_sizes(window))[:2]
    return out.transpose(1, 2), lse


def pair_backward(q, k, v, out, lse, dout, scale: float, causal: bool, window: Optional[int] = None):
    """The pair's share of the gradients given the final merged ``out`` and ``lse`` (FA4 forms
    rowsum(dout * out) from them). dq, dk, dv come in q's dtype (dk/dv summed over GQA groups
    by the kernel, in float32 before the cast)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    qt, kt, vt, ot, dot = (x.transpose(1, 2) for x in (q, k, v, out.to(q.dtype), dout.to(q.dtype)))
    dq, dk, dv = _flash_attn_bwd(qt, kt, vt, ot, dot, lse.float().contiguous(), scale, causal,
                                 **_window_sizes(window))[:3]
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
