"""Fused Triton kernels for the fast inference path: RMSNorm, RoPE applied while splitting the
fused QKV projection into per-head tensors, and SwiGLU.

Around the matrix products, a Llama layer in plain torch is a chain of memory-bound kernels:
the norm upcasts, squares, averages and scales in separate passes; RoPE on a strided
[b, heads, s, d] view runs four elementwise kernels and two concatenations per tensor, then
the prefill copies the result once more into its whole-prompt buffer; SwiGLU is two passes.
At 128K tokens these took 2.0 s of a 7.6 s hybrid prefill on one H100
(``benchmarks/profile_inference.py``). Here each is one pass that reads its input once and
writes its output once (RoPE straight into the destination buffer).

``layer_ops`` calls these only where ``fusable_*`` says the kernel computes exactly what the
model's module does (RMSNorm with a weight; full-width RoPE without q/k norms or a QKV bias;
SwiGLU without biases, clamps or offsets) and runs the module itself otherwise. Forward only.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from megatron.core.transformer.identity_op import IdentityOp

# ---- RMSNorm ----


@triton.jit
def _rms_norm_kernel(X, W, Y, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


def fusable_norm(norm) -> bool:
    return isinstance(norm, torch.nn.RMSNorm) and norm.weight is not None \
        and len(norm.normalized_shape) == 1


def rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a ``fusable_norm`` module, over the last dim of x."""
    n = x.shape[-1]
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    x2 = x.contiguous().view(-1, n)
    y = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, module.weight, y, n, eps,
                                     BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4)
    return y.view(x.shape)


# ---- QKV split + RoPE ----


@triton.jit
def _qkv_rope_kernel(
    QKV, FREQS, Q, K, V, n_tokens, batch,
    stride_fs, stride_fb, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program: BLOCK_T tokens x one query group ([PER_GROUP query heads, k, v] rows of
    Megatron's fused layout). Token t of the [s, b] input is (s = t // batch, b = t % batch)."""
    pid_t, group = tl.program_id(0), tl.program_id(1)
    n_groups = tl.num_programs(1)
    tok = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    live = tok < n_tokens
    s, b = tok // batch, tok % batch
    d = tl.arange(0, HEAD_DIM)
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    else:  # pairs (i, i + d/2)
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
    m = live[:, None]
    angle = tl.load(FREQS + s[:, None] * stride_fs + b[:, None] * stride_fb + d[None, :], mask=m,
                    other=0.0)
    cos, sin = tl.cos(angle), tl.sin(angle) * sign[None, :]
    row = QKV + tok[:, None] * (n_groups * (PER_GROUP + 2) * HEAD_DIM) \
        + group * (PER_GROUP + 2) * HEAD_DIM
    for r in tl.static_range(PER_GROUP + 2):
        x = tl.load(row + r * HEAD_DIM + d[None, :], mask=m, other=0.0)
        if r < PER_GROUP + 1:  # queries and the key are rotated, the value is not
            xp = tl.load(row + r * HEAD_DIM + partner[None, :], mask=m, other=0.0)
            x = x.to(tl.float32) * cos + xp.to(tl.float32) * sin
        if r < PER_GROUP:
            out = Q + b[:, None] * stride_qb + (group * PER_GROUP + r) * stride_qh \
                + s[:, None] * stride_qs + d[None, :]
        elif r == PER_GROUP:
            out = K + b[:, None] * stride_kb + group * stride_kh + s[:, None] * stride_ks + d[None, :]
        else:
            out = V + b[:, None] * stride_vb + group * stride_vh + s[:, None] * stride_vs + d[None, :]
        tl.store(out, x.to(out.dtype.element_ty), mask=m)


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
    d = attn.hidden_size_per_attention_head
    qkv, _ = attn.linear_qkv(h)  # [s, b, groups * (per_group + 2) * d]
    s, b = qkv.shape[:2]
    qkv = qkv.contiguous()
    if out is None:
        out = (qkv.new_empty(b, groups * per_group, s, d), qkv.new_empty(b, groups, s, d),
               qkv.new_empty(b, groups, s, d))
    q, k, v = out
    assert all(t.stride(-1) == 1 for t in out), "outputs need unit stride over the head dim"
    # freqs [B or 1, 1, S or 1, d] -> strides over s and b (0 where broadcast).
    f = freqs.to(torch.float32)
    stride_fb = f.stride(0) if f.shape[0] > 1 else 0
    stride_fs = f.stride(2) if f.shape[2] > 1 else 0
    block_t = 16
    grid = (triton.cdiv(s * b, block_t), groups)
    _qkv_rope_kernel[grid](
        qkv, f, q, k, v, s * b, b, stride_fs, stride_fb,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        PER_GROUP=per_group, HEAD_DIM=d, INTERLEAVED=bool(rotary_interleaved), BLOCK_T=block_t,
        num_warps=4)
    return q, k, v


# ---- SwiGLU MLP ----


@triton.jit
def _swiglu_kernel(X, Y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


def fusable_mlp(mlp) -> bool:
    c = mlp.config
    return (c.gated_linear_unit and mlp.activation_func is F.silu
            and not getattr(c, "use_te_activation_func", False)
            and getattr(c, "activation_func_clamp_value", None) is None
            and getattr(c, "glu_linear_offset", 0.0) == 0.0
            and mlp.linear_fc1.bias is None)


def swiglu_mlp(module, h: torch.Tensor):
    """``module(h)`` for a ``fusable_mlp`` Megatron MLP: (output, bias)."""
    inter, _ = module.linear_fc1(h)  # [s, b, 2F]: gate then up, per TP rank
    two_f = inter.shape[-1]
    x2 = inter.contiguous().view(-1, two_f)
    y = x2.new_empty(x2.shape[0], two_f // 2)
    block = 1024
    _swiglu_kernel[(x2.shape[0], triton.cdiv(two_f // 2, block))](x2, y, two_f // 2, BLOCK=block)
    return module.linear_fc2(y.view(*inter.shape[:-1], two_f // 2))
