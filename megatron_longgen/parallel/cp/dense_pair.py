"""Dense-pair kernels for ring steps of full layers without packed documents.

A ring step's (query chunk, key chunk) pair is then one contiguous key block, either the causal
diagonal or fully visible, which a dense flash kernel runs faster than the chunk kernels that
take arbitrary key positions. The interface is ``backends.DensePairBackend``; registered here:

- ``fa4``: flash-attn-4's low-level forward / backward (``attention/fa4.py``), sm90+, 16 bits;
  also the AttnSink exchange's sliding window (``window=``).
- ``sdpa``: torch's flash SDPA ops (sm80+, 16 bits). They run equal head counts here: K/V are
  expanded for GQA and dK/dV summed back over the group in float32.
- ``dense_reference``: the exact pure-torch attention with a causal, windowed or all-true mask
  (CPU tests force it to run the ring's and the exchange's dense dispatch).
"""

from __future__ import annotations

import torch

from megatron_longgen.attention import fa4
from megatron_longgen.attention.backends import DensePairBackend, register_dense_pair_backend
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.parallel.cp.compute import masked_backward

SDPA_DTYPES = (torch.float16, torch.bfloat16)


def _mask(sq: int, sk: int, causal: bool, device, window=None) -> torch.Tensor:
    """[1, sq, sk]: all keys; the causal diagonal (queries and keys at the same positions); or,
    with ``window``, the ``window`` keys ending at key i + sk - sq for query i."""
    if window is not None:
        if not causal or sk < sq:
            raise ValueError(f"a windowed dense pair is causal with at least as many keys as queries; "
                             f"got causal={causal}, {sq} queries, {sk} keys")
        at = torch.arange(sq, device=device)[:, None] + (sk - sq)
        key = torch.arange(sk, device=device)[None]
        return ((key <= at) & (at - key < window))[None]
    if causal and sq != sk:
        raise ValueError(f"a causal dense pair has queries and keys at the same positions; got {sq} and {sk}")
    mask = torch.ones(1, sq, sk, dtype=torch.bool, device=device)
    return mask.tril() if causal else mask


# ---------------------------------------------------------------- exact reference

def _reference_forward(q, k, v, scale, causal, window=None):
    out, lse = masked_attention(q, k, v, _mask(q.shape[2], k.shape[2], causal, q.device, window), scale)
    return out.to(lse.dtype), lse


def _reference_backward(q, k, v, out, lse, dout, scale, causal, window=None):
    """Float32 (float64 for float64 inputs) gradients."""
    f32 = torch.promote_types(q.dtype, torch.float32)
    delta = (dout.to(f32) * out.to(f32)).sum(-1)
    mask = _mask(q.shape[2], k.shape[2], causal, q.device, window)
    return masked_backward(q, k, v, mask, scale, lse, dout, delta)


# ---------------------------------------------------------------- torch's flash SDPA ops

def _expand(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _sdpa_supports(device, dtype: torch.dtype, head_dim: int) -> bool:
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and dtype in SDPA_DTYPES
            and head_dim % 8 == 0 and head_dim <= 256 and torch.cuda.get_device_capability(device) >= (8, 0))


def _sdpa_forward(q, k, v, scale, causal):
    """out [b, hq, sq, d] in q's dtype, lse [b, hq, sq] float32 natural."""
    g = q.shape[1] // k.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q, _expand(k, g), _expand(v, g), 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _sdpa_backward(q, k, v, out, lse, dout, scale, causal):
    """dq in q's dtype; dk, dv in k's dtype, or float32 when summed over a GQA group."""
    b, hkv, sk, d = k.shape
    g, sq = q.shape[1] // hkv, q.shape[2]
    no_seqs = None  # cum_seq_q / cum_seq_k undefined, as the dense forward returns them (an empty tensor reads as varlen)
    no_rng = torch.empty((), dtype=torch.int64)  # philox seed / offset: no dropout
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout.to(q.dtype), q, _expand(k, g), _expand(v, g), out.to(q.dtype), lse.float().contiguous(),
        no_seqs, no_seqs, sq, sk, 0.0, causal, no_rng, no_rng, scale=scale)
    if g > 1:
        dk = dk.view(b, hkv, g, sk, d).sum(2, dtype=torch.float32)
        dv = dv.view(b, hkv, g, sk, d).sum(2, dtype=torch.float32)
    return dq, dk, dv


register_dense_pair_backend(DensePairBackend("dense_reference", _reference_forward, _reference_backward,
                                             lambda device, dtype, head_dim: True, window=True))
register_dense_pair_backend(DensePairBackend("sdpa", _sdpa_forward, _sdpa_backward, _sdpa_supports))
if fa4.fa4_installed():
    register_dense_pair_backend(DensePairBackend("fa4", fa4.pair_forward, fa4.pair_backward,
                                                 fa4.pair_supports, window=True))
