"""The fast inference path's fused layer ops: RMSNorm, RoPE applied while splitting the fused
QKV projection into per-head tensors, and SwiGLU, as the Triton kernels of
``models/fused_ops.py`` (the ones training uses).

Around the matrix products, a Llama layer in plain torch is a chain of memory-bound kernels:
the norm upcasts, squares, averages and scales in separate passes; RoPE on a strided
[b, heads, s, d] view runs four elementwise kernels and two concatenations per tensor, then
the prefill copies the result once more into its whole-prompt buffer; SwiGLU is two passes.
At 128K tokens these took 2.0 s of a 7.6 s hybrid prefill on one H100
(``benchmarks/profile_inference.py``). Here each is one pass that reads its input once and
writes its output once (RoPE straight into the destination buffer).

``layer_ops`` calls these only where ``fusable_*`` says the kernel computes exactly what the
model's module does (RMSNorm with a weight; full-width RoPE without q/k norms or a QKV bias;
SwiGLU without biases, clamps or offsets) and runs the module itself otherwise.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.transformer.identity_op import IdentityOp

from megatron_longgen.models import fused_ops
from megatron_longgen.models.mlp import plain_swiglu


def fusable_norm(norm) -> bool:
    return isinstance(norm, torch.nn.RMSNorm) and norm.weight is not None \
        and len(norm.normalized_shape) == 1


def rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a ``fusable_norm`` module, over the last dim of x."""
    return fused_ops.rms_norm(x, module.weight, module.eps)


def fusable_qkv(attn, freqs: torch.Tensor) -> bool:
    d = attn.hidden_size_per_attention_head
    no_qk_norm = all(n is None or isinstance(n, IdentityOp) for n in (attn.q_layernorm, attn.k_layernorm))
    return (no_qk_norm and freqs.shape[-1] == d
            and d >= 16 and d & (d - 1) == 0 and attn.linear_qkv.bias is None)


def qkv_rope(attn, h: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool,
             out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None):
    """``layer_ops.project_qkv`` for a ``fusable_qkv`` attention, RoPE and the head split in
    one kernel: q [b, heads, s, d] and k/v [b, groups, s, d] of normed input h [s, b, hidden],
    written into ``out`` (views with unit stride over d, e.g. whole-prompt buffers'
    [:, :, start:end]) or new tensors. ``freqs`` (float32 angles) broadcasts to [b, 1, s, d]."""
    groups = attn.num_query_groups_per_partition
    per_group = attn.num_attention_heads_per_partition // groups
    qkv, _ = attn.linear_qkv(h)  # [s, b, groups * (per_group + 2) * d]
    return fused_ops.split_qkv_rope(qkv, freqs, groups, per_group, attn.hidden_size_per_attention_head,
                                    rotary_interleaved, out)


def fusable_mlp(mlp) -> bool:
    return plain_swiglu(mlp) and mlp.linear_fc1.bias is None


def swiglu_mlp(module, h: torch.Tensor):
    """``module(h)`` for a ``fusable_mlp`` Megatron MLP: (output, bias)."""
    inter, _ = module.linear_fc1(h)  # [s, b, 2F]: gate then up, per TP rank
    return module.linear_fc2(fused_ops.swiglu(inter))
