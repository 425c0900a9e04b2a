"""LongGen for HF transformers: a Llama whose sparse layers apply a static attention pattern.

Full layers are plain ``LlamaAttention``. Sparse layers compute attention in plain torch
(SDPA with a boolean mask) on CPU and for short queries (decoding); on GPU a prompt runs
through FlexAttention with the same rule as a block mask, so no L x L mask is built. The pattern rules below are the same
as the training code's: a query at position q reads key k (k <= q) when

* ``attn_sink``: ``k < sink_tokens`` or ``q - k < sliding_window_size``;
* ``block_sparse``: with blocks qb = q // B, kb = k // B, ``qb - kb < local_blocks`` or
  ``(kb + offset + 1) % vert_stride == 0``; offset is 0 with ``homo_head``, else
  ``g * max(1, vert_stride // num_key_value_heads) % vert_stride`` for the query group g of
  the head.

Positions count from the first token in the cache (no left padding in sparse layers).
This file must stay self-contained: it is copied into exported model folders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    apply_rotary_pos_emb,
    repeat_kv,
)

from .configuration_longgen import LongGenConfig


def longgen_sparse_mask(config, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean mask [H or 1, len(q_pos), len(k_pos)] of a sparse layer (True = attend).

    H = num_attention_heads when heads differ (block_sparse without homo_head), else 1.
    """
    q, k = q_pos.long()[:, None], k_pos.long()[None, :]
    causal = k <= q
    if config.sparse_attention == "attn_sink":
        return (causal & ((k < config.sink_tokens) | (q - k < config.sliding_window_size)))[None]
    block, stride = config.sparse_block_size, config.vert_stride
    qb, kb = q // block, k // block
    groups = config.num_key_value_heads
    if config.homo_head or groups == 1 or stride == 1:
        offsets = torch.zeros(1, dtype=torch.long, device=q.device)
    else:
        heads = torch.arange(config.num_attention_heads, device=q.device)
        group = heads // (config.num_attention_heads // groups)
        offsets = (group * max(1, stride // groups)) % stride
    vertical = (kb[None] + offsets[:, None, None] + 1) % stride == 0
    return causal[None] & (((qb - kb) < config.local_blocks)[None] | vertical)


def _head_offsets(config, device) -> torch.Tensor:
    heads = torch.arange(config.num_attention_heads, device=device)
    groups, stride = config.num_key_value_heads, config.vert_stride
    if config.homo_head or groups == 1 or stride == 1:
        return torch.zeros_like(heads)
    return ((heads // (config.num_attention_heads // groups)) * max(1, stride // groups)) % stride


_BLOCK_MASKS = {}


def flex_sparse_attention(config, query, key, value, scale: float, compile: bool = True):
    """The sparse layer through FlexAttention: q [b, h, q_len, d] at the last q_len positions
    of k [b, h_kv, k_len, d]. Block masks are cached per (lengths, device)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q_len, k_len, heads = query.shape[2], key.shape[2], query.shape[1]
    cache_key = (q_len, k_len, heads, str(query.device), compile)
    if cache_key not in _BLOCK_MASKS:
        offset_q = k_len - q_len
        head_offsets = _head_offsets(config, query.device)

        def mask_mod(b, h, q_idx, kv_idx):
            q = q_idx + offset_q
            causal = kv_idx <= q
            if config.sparse_attention == "attn_sink":
                return causal & ((kv_idx < config.sink_tokens) | (q - kv_idx < config.sliding_window_size))
            qb, kb = q // config.sparse_block_size, kv_idx // config.sparse_block_size
            vertical = (kb + head_offsets[h] + 1) % config.vert_stride == 0
            return causal & ((qb - kb < config.local_blocks) | vertical)

        _BLOCK_MASKS[cache_key] = create_block_mask(
            mask_mod, None, heads, q_len, k_len, device=query.device, _compile=compile)
    attend = torch.compile(flex_attention) if compile else flex_attention
    return attend(query, key, value, block_mask=_BLOCK_MASKS[cache_key], scale=scale,
                  enable_gqa=query.shape[1] != key.shape[1])


def _allowed_from_hf_mask(attention_mask, q_len: int, k_len: int):
    """HF passes None, a boolean mask (True = attend) or an additive float mask."""
    if attention_mask is None:
        return None
    mask = attention_mask[..., -q_len:, :k_len]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


class LongGenSparseAttention(LlamaAttention):
    """LlamaAttention (same weights) with the layer's sparse pattern applied."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        if cache is None:  # older transformers name the cache past_key_values
            cache = kwargs.pop("past_key_values", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        q_len, k_len = query.shape[2], key.shape[2]
        device = query.device
        hf_allowed = _allowed_from_hf_mask(attention_mask, q_len, k_len)
        no_padding = hf_allowed is None or bool(hf_allowed[..., -1, :].all())
        if query.is_cuda and q_len > 1 and no_padding:
            out = flex_sparse_attention(self.config, query, key, value, self.scaling)
            out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
            return self.o_proj(out), None
        q_pos = torch.arange(k_len - q_len, k_len, device=device)
        allowed = longgen_sparse_mask(self.config, q_pos, torch.arange(k_len, device=device))[None]
        if hf_allowed is not None:
            allowed = allowed & hf_allowed
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=self.scaling)
        # A row with no allowed key (padding) gives NaN in SDPA; its output is defined as 0.
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
        out = out.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), None


class LongGenModel(LlamaModel):
    config_class = LongGenConfig

    def __init__(self, config: LongGenConfig):
        super().__init__(config)
        full = set(config.full_attention_layers)
        for i, layer in enumerate(self.layers):
            if i not in full:
                layer.self_attn = LongGenSparseAttention(config, layer_idx=i)
        self.post_init()


class LongGenForCausalLM(LlamaForCausalLM):
    config_class = LongGenConfig

    def __init__(self, config: LongGenConfig):
        # LlamaForCausalLM.__init__ would build a LlamaModel first; build ours only.
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LongGenModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["LongGenConfig", "LongGenForCausalLM", "LongGenModel", "LongGenSparseAttention",
           "flex_sparse_attention", "longgen_sparse_mask"]
