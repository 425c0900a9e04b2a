"""The pieces of a Megatron transformer layer that every inference path shares.

Only attention differs between the exact path and the fast one; the projections, norms, MLP
and residuals are the model's own modules, run here in the layer's order. With ``fused=True``
(the fast path) the norms, RoPE with the head split, and SwiGLU run as the single-pass Triton
kernels of ``fused_ops`` wherever those compute exactly what the module does.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_longgen.inference import fused_ops

QKV = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def norm(module, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    return fused_ops.rms_norm(module, x) if fused and fused_ops.fusable_norm(module) else module(x)


def project_qkv(attn, x: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool,
                fused: bool = False, out: Optional[QKV] = None) -> QKV:
    """q [b, heads, s, d], k/v [b, groups, s, d] of a SelfAttention for normed input x
    [s, b, hidden], RoPE applied with ``freqs`` (broadcastable to [b, 1, s, d], float32).
    ``out``: tensors of those shapes to write them into."""
    if fused and fused_ops.fusable_qkv(attn, freqs):
        return fused_ops.qkv_rope(attn, x, freqs, rotary_interleaved, out)
    q, k, v = _project_qkv(attn, x, freqs, rotary_interleaved)
    if out is None:
        return q, k, v
    for dst, src in zip(out, (q, k, v)):
        dst.copy_(src)
    return out


def _project_qkv(attn, x, freqs, rotary_interleaved) -> QKV:
    groups = attn.num_query_groups_per_partition
    per_group = attn.num_attention_heads_per_partition // groups
    d = attn.hidden_size_per_attention_head
    qkv, _ = attn.linear_qkv(x)  # [s, b, groups * (per_group + 2) * d]
    s, b = qkv.shape[:2]
    # Megatron's fused layout: per query group [its query heads..., k, v].
    qkv = qkv.view(s, b, groups, per_group + 2, d)
    q = qkv[:, :, :, :per_group].reshape(s, b, groups * per_group, d)
    k, v = qkv[:, :, :, per_group], qkv[:, :, :, per_group + 1]
    if attn.q_layernorm is not None:
        q = attn.q_layernorm(q)
    if attn.k_layernorm is not None:
        k = attn.k_layernorm(k)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    # Angles stay float32 (cos/sin are cast after, as Megatron does): positions past a few
    # thousand would lose their angle in bf16.
    q = _apply_rotary_pos_emb_bshd(q, freqs, rotary_interleaved=rotary_interleaved)
    k = _apply_rotary_pos_emb_bshd(k, freqs, rotary_interleaved=rotary_interleaved)
    return q, k, v


def run_layer(layer, x: torch.Tensor, attend: Callable[[object, torch.Tensor], torch.Tensor],
              fused: bool = False):
    """One pre-norm layer: ``attend(self_attention, normed x)`` returns the attention output
    [s, b, heads * d] before the output projection."""
    h = norm(layer.input_layernorm, x, fused)
    return finish_layer(layer, x, attend(layer.self_attention, h), fused)


def finish_layer(layer, x: torch.Tensor, attn_out: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """The rest of a layer once its attention output [s, b, heads * d] for input x is known:
    output projection, residual, MLP, residual."""
    out, bias = layer.self_attention.linear_proj(attn_out)
    x = x + (out if bias is None else out + bias)
    h = norm(layer.pre_mlp_layernorm, x, fused)
    mlp = layer.mlp
    out, bias = fused_ops.swiglu_mlp(mlp, h) if fused and fused_ops.fusable_mlp(mlp) else mlp(h)
    return x + (out if bias is None else out + bias)


def output_logits(model, x: torch.Tensor) -> torch.Tensor:
    """Final norm and output layer on x [s, b, hidden]: logits [s, b, vocab] over the whole
    vocabulary (the output layer is vocab-parallel under tensor parallelism: gathered here;
    a no-op at TP = 1). A tied model's output layer holds no weight: it is the embedding's."""
    return output_layer(model, model.decoder.final_layernorm(x))


def output_layer(model, h: torch.Tensor) -> torch.Tensor:
    """``output_logits`` of rows h that the final norm has already normed."""
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(h, weight=weight)
    return gather_from_tensor_model_parallel_region(logits)
