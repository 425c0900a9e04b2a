"""Ring attention for the full (causal) layers.

Forward: K/V blocks travel CP - 1 hops around the ring; while one hop is in flight the rank
attends its queries to the block it holds, skipping fully-masked chunk pairs, and merges the
partial results by log-sum-exp. Backward (explicit): K/V travel the ring again together with
a dK/dV accumulator; each rank adds its share and passes it on, and a last hop brings every
block's gradient home. The dK/dV hop of one step overlaps the next step's compute.

Which kernel computes a pair: ``backends.ring_pair_backend``. A causal layer without packed
documents takes a dense-pair backend on CUDA (FA4, else torch's flash SDPA op: the causal
diagonal or a fully visible block, ``ring_pairs``' needs_mask); others go through
``compute.attend`` (the Triton chunk kernels). The merge, dQ and the dK/dV accumulator that
travels are float32 either way: the flash dense backends return each pair's gradients in the
input dtype (SDPA's dK/dV summed over a GQA group: float32), the chunk backends in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_longgen.attention.backends import DensePairBackend, ring_pair_backend
from megatron_longgen.attention.patterns import CausalPattern, Pattern
from megatron_longgen.parallel.cp import dense_pair  # noqa: F401  (registers the dense-pair backends)
from megatron_longgen.parallel.cp.comm import Ring, wait
from megatron_longgen.parallel.cp.compute import attend, attend_backward, merge
from megatron_longgen.parallel.cp.plan import ring_pairs


@dataclass
class RingSetup:
    ring: Ring
    pattern: Pattern
    heads: torch.Tensor  # global query heads of this TP rank
    scale: float
    layer: int
    seq_len: int
    positions: torch.Tensor  # [CP, 2c] global positions held by each rank, on the device
    cu_seqlens: Optional[torch.Tensor] = None


def _pairs(setup: RingSetup, step: int, c: int):
    """(query slice, key slice, causal) of a ring step's pairs that are not fully masked
    (static); causal: the diagonal (the same positions), else every key is visible."""
    r, cp = setup.ring.rank, setup.ring.size
    for qi, ki, needs_mask in ring_pairs(r, cp, setup.seq_len, step):
        yield slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c), needs_mask


def ring_kernel(setup: RingSetup, q: torch.Tensor):
    """The dense-pair or chunk backend of this layer's ring steps for inputs like ``q``."""
    dense_layer = isinstance(setup.pattern, CausalPattern) and setup.cu_seqlens is None
    return ring_pair_backend(q.device, q.dtype, q.shape[-1], dense_layer)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup: RingSetup):
        ring, c = setup.ring, q.shape[2] // 2
        q_pos = setup.positions[ring.rank]
        out = q.new_zeros(q.shape, dtype=torch.promote_types(q.dtype, torch.float32))
        lse = out.new_full(q.shape[:3], float("-inf"))
        kv = torch.stack([k, v]).contiguous()
        kernel = ring_kernel(setup, q)
        dense = isinstance(kernel, DensePairBackend)
        for step in range(ring.size):
            if step < ring.size - 1:  # next block in flight while this one is used
                incoming, requests = ring.start(kv, setup.layer, "ring", "fwd")
            k_pos = setup.positions[(ring.rank - step) % ring.size]
            for qs, ks, causal in _pairs(setup, step, c):
                if dense:
                    o, l = kernel.forward(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], setup.scale, causal)
                else:
                    o, l = attend(q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], q_pos[qs], k_pos[ks],
                                  setup.pattern, setup.heads, setup.scale, setup.cu_seqlens, kernel)
                out[:, :, qs], lse[:, :, qs] = merge(out[:, :, qs], lse[:, :, qs], o, l)
            if step < ring.size - 1:
                wait(requests)
                kv = incoming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup, ctx.kernel = setup, kernel
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        setup = ctx.setup
        ring, c = setup.ring, q.shape[2] // 2
        q_pos = setup.positions[ring.rank]
        kernel = ctx.kernel
        dense = isinstance(kernel, DensePairBackend)
        if dense:  # flash kernels take the final output in the input dtype and form delta themselves
            out_in = out.to(q.dtype)
        else:
            delta = (dout.to(out.dtype) * out).sum(-1)
        dq = torch.zeros_like(out)
        kv = torch.stack([k, v]).contiguous()
        dkv_in, dkv_requests = None, None
        for step in range(ring.size):
            if step < ring.size - 1:
                incoming, kv_requests = ring.start(kv, setup.layer, "ring", "bwd")
            k_pos = setup.positions[(ring.rank - step) % ring.size]
            dkv = out.new_zeros((2,) + tuple(k.shape))
            for qs, ks, causal in _pairs(setup, step, c):
                if dense:
                    dq_part, dk_part, dv_part = kernel.backward(
                        q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], out_in[:, :, qs], lse[:, :, qs],
                        dout[:, :, qs], setup.scale, causal)
                else:
                    dq_part, dk_part, dv_part = attend_backward(
                        q[:, :, qs], kv[0][:, :, ks], kv[1][:, :, ks], q_pos[qs], k_pos[ks], setup.pattern,
                        setup.heads, setup.scale, setup.cu_seqlens, lse[:, :, qs], dout[:, :, qs],
                        delta[:, :, qs], kernel)
                dq[:, :, qs] += dq_part
                dkv[0][:, :, ks] += dk_part
                dkv[1][:, :, ks] += dv_part
            if dkv_requests is not None:  # what the earlier ranks added to this block
                wait(dkv_requests)
                dkv += dkv_in
            dkv_in, dkv_requests = ring.start(dkv, setup.layer, "ring", "bwd")
            if step < ring.size - 1:
                wait(kv_requests)
                kv = incoming
        wait(dkv_requests)  # the last hop brings this rank's own dK/dV home
        return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), None


def ring_attention(q, k, v, setup: RingSetup) -> torch.Tensor:
    return RingAttention.apply(q, k, v, setup)
