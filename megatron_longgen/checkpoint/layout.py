"""Tensor layout between HF Llama and Megatron-Core's GPTModel (one TP=1, PP=1 copy).

* QKV: HF keeps q_proj, k_proj, v_proj; Megatron fuses them into ``linear_qkv`` grouped per
  query group: [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]. Grouping
  per query group is what lets tensor parallelism split the fused weight contiguously.
* SwiGLU: HF's gate_proj and up_proj are Megatron's ``linear_fc1`` = [gate; up] (Megatron's
  checkpoint code splits gate and up itself when it shards for TP, so TP=1 stacking is right).
* Norms: HF's post_attention_layernorm is Megatron's pre_mlp_layernorm.
* Vocabulary: Megatron's tables are padded with zero rows; exports trim them back.
* RoPE: both use the rotate-half convention, so q/k rows need no permutation.
* QKV biases (Qwen2) fuse like the weights' rows; q/k norms (Qwen3) are one head wide and
  map one to one (``self_attn.q_norm`` = ``self_attention.q_layernorm``).
* Tied embeddings: Megatron has no ``output_layer.weight`` (the word embeddings serve) and
  the HF folder no ``lm_head.weight``.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from megatron_longgen.checkpoint.errors import ConversionError
from megatron_longgen.checkpoint.hf_files import LlamaShape

EMBED = ("model.embed_tokens.weight", "embedding.word_embeddings.weight")
FINAL_NORM = ("model.norm.weight", "decoder.final_layernorm.weight")
OUTPUT = ("lm_head.weight", "output_layer.weight")

# HF per-layer suffix -> Megatron per-layer suffix, for tensors that map one to one.
ONE_TO_ONE = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
GATE_UP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
LINEAR_QKV, LINEAR_FC1 = "self_attention.linear_qkv.weight", "mlp.linear_fc1.weight"
QKV_BIAS = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
LINEAR_QKV_BIAS = "self_attention.linear_qkv.bias"
QK_NORM = {"self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
           "self_attn.k_norm.weight": "self_attention.k_layernorm.weight"}

# Tensors some HF Llama checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def megatron_layer_prefix(i: int) -> str:
    return f"decoder.layers.{i}."


def expected_hf_shapes(shape: LlamaShape) -> Dict[str, tuple]:
    """Every tensor an HF Llama of this shape has, with its shape (lm_head when untied)."""
    h, d = shape.hidden_size, shape.head_dim
    q_rows, kv_rows = shape.num_attention_heads * d, shape.num_query_groups * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_rows, h),
        "self_attn.k_proj.weight": (kv_rows, h),
        "self_attn.v_proj.weight": (kv_rows, h),
        "self_attn.o_proj.weight": (h, q_rows),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (shape.ffn_hidden_size, h),
        "mlp.up_proj.weight": (shape.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, shape.ffn_hidden_size),
    }
    if shape.qkv_bias:
        per_layer.update({QKV_BIAS[0]: (q_rows,), QKV_BIAS[1]: (kv_rows,), QKV_BIAS[2]: (kv_rows,)})
    if shape.qk_norm:
        per_layer.update({name: (d,) for name in QK_NORM})
    out = {EMBED[0]: (shape.vocab_size, h), FINAL_NORM[0]: (h,)}
    if not shape.tie_word_embeddings:
        out[OUTPUT[0]] = (shape.vocab_size, h)
    for i in range(shape.num_layers):
        out.update({hf_layer_prefix(i) + k: v for k, v in per_layer.items()})
    return out


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: LlamaShape) -> torch.Tensor:
    """Rows grouped per query group; ``q, k, v`` are weights [rows, h] or biases [rows]."""
    g, d, rest = shape.num_query_groups, shape.head_dim, q.shape[1:]
    per_group = shape.num_attention_heads // g
    parts = (q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, shape: LlamaShape):
    g, d, rest = shape.num_query_groups, shape.head_dim, qkv.shape[1:]
    per_group = shape.num_attention_heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def megatron_layer_from_hf(get: Callable[[str], torch.Tensor], i: int, shape: LlamaShape) -> Dict[str, torch.Tensor]:
    """Megatron tensors (per-layer suffix -> tensor) of HF layer ``i``; ``get`` reads one HF tensor."""
    p = hf_layer_prefix(i)
    out = {mg: get(p + hf) for hf, mg in ONE_TO_ONE.items()}
    out[LINEAR_QKV] = fuse_qkv(*(get(p + name) for name in QKV), shape)
    if shape.qkv_bias:
        out[LINEAR_QKV_BIAS] = fuse_qkv(*(get(p + name) for name in QKV_BIAS), shape)
    if shape.qk_norm:
        out.update({mg: get(p + hf) for hf, mg in QK_NORM.items()})
    out[LINEAR_FC1] = torch.cat([get(p + name) for name in GATE_UP], dim=0)
    return out


def hf_layer_from_megatron(params: Dict[str, torch.Tensor], i: int, shape: LlamaShape) -> Dict[str, torch.Tensor]:
    """HF tensors (full name -> tensor) of Megatron layer ``i``; ``params`` is keyed by suffix."""
    p = hf_layer_prefix(i)
    out = {p + hf: params[mg] for hf, mg in ONE_TO_ONE.items()}
    for name, t in zip(QKV, split_qkv(params[LINEAR_QKV], shape)):
        out[p + name] = t
    if shape.qkv_bias:
        for name, t in zip(QKV_BIAS, split_qkv(params[LINEAR_QKV_BIAS], shape)):
            out[p + name] = t
    if shape.qk_norm:
        out.update({p + hf: params[mg] for hf, mg in QK_NORM.items()})
    gate, up = torch.chunk(params[LINEAR_FC1], 2, dim=0)
    out[p + GATE_UP[0]], out[p + GATE_UP[1]] = gate, up
    return out


def pad_vocab(table: torch.Tensor, padded_rows: int) -> torch.Tensor:
    if table.shape[0] > padded_rows:
        raise ConversionError(f"vocabulary table has {table.shape[0]} rows, more than {padded_rows}")
    if table.shape[0] == padded_rows:
        return table
    pad = table.new_zeros(padded_rows - table.shape[0], table.shape[1])
    return torch.cat([table, pad], dim=0)
