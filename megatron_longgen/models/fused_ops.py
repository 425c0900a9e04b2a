"""Fused Triton layer ops, forward and backward: RMSNorm, RoPE, SwiGLU; and the QKV split with
RoPE of the inference fast path. One implementation of each op for training and inference.

Around the matrix products a Llama layer in plain torch is a chain of memory-bound kernels:
the norm upcasts, squares, averages and scales in separate passes (and its backward as many
again); Megatron's unfused RoPE runs chunk, cat, negate and four multiply/adds per tensor;
SwiGLU is a chunk and two passes. Here each op is one pass that reads its input once and writes
its output once, forward and backward, with fp32 math on bf16 / fp16 / fp32 tensors.

The autograd functions (``rms_norm``, ``apply_rope``, ``swiglu``) run the Triton kernels on any
tensor (CPU tensors in Triton's interpreter, for tests). Which module uses them, and when, is
decided by the callers: ``models/norm.py`` (RMSNorm on CUDA), ``install_fused_rope`` (Megatron's
``apply_rope_fusion`` hook), ``models/mlp.py`` (SwiGLU), ``inference/fused_ops.py`` (fast path).
The plain torch modules stay the exact path on CPU and the tests' reference.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# ---- RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over the last dim ----


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, rows_per_program,
                         BLOCK: tl.constexpr):
    """dx = rstd * (w*dy - xhat * mean(xhat * w*dy)), xhat = x * rstd, for this program's
    rows; their share of dw = sum over rows of dy * xhat goes to DW_PARTIAL[program]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * rows_per_program
    for i in range(rows_per_program):
        row = (first + i).to(tl.int64)
        if row < n_rows:
            x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            xhat = x * rstd
            wdy = w * dy
            dx = rstd * (wdy - xhat * (tl.sum(xhat * wdy, axis=0) / n_cols))
            tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=mask)


def _norm_warps(n: int) -> int:
    return 8 if n >= 4096 else 4


def _dw_programs(x: torch.Tensor, rows: int) -> int:
    """Programs of the norm backward: a few per SM, each summing dw over a run of rows."""
    per_device = 8 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(rows, per_device))


class RMSNormFunction(torch.autograd.Function):
    # Outputs and gradients are allocated whole (no views of 2-D buffers), so that callers
    # may modify them in place as they may torch's.
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = x.contiguous()
        n = x.shape[-1]
        rows = x.numel() // n
        y = torch.empty_like(x)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        _rms_norm_fwd_kernel[(rows,)](x, weight, y, rstd, n, eps, BLOCK=triton.next_power_of_2(n),
                                      num_warps=_norm_warps(n))
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n = x.shape[-1]
        rows = x.numel() // n
        dx = torch.empty_like(x)
        programs = _dw_programs(x, rows)
        dw_partial = torch.empty(programs, n, dtype=torch.float32, device=x.device)
        _rms_norm_bwd_kernel[(programs,)](dy.contiguous(), x, weight, rstd, dx, dw_partial, rows, n,
                                          triton.cdiv(rows, programs),
                                          BLOCK=triton.next_power_of_2(n), num_warps=_norm_warps(n))
        return dx, dw_partial.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: Optional[float]) -> torch.Tensor:
    """``torch.nn.functional.rms_norm(x, (n,), weight, eps)`` over the last dim, in one pass
    each way; the output has x's dtype. ``eps`` None: x's machine epsilon, as torch's."""
    return RMSNormFunction.apply(x, weight, eps if eps is not None else torch.finfo(x.dtype).eps)


# ---- RoPE ----
# Megatron's convention: out = t * cos(f) + rotate_half(t) * sin(f) with fp32 angles f
# ([s, 1, 1, d], the pairs' angle twice). A pair is (i, i + d/2), or (2i, 2i + 1) interleaved:
# y_a = cos_a x_a - sin_a x_b, y_b = cos_b x_b + sin_b x_a. The backward is the transpose
# (the rotation by -f): dx_a = cos_a dy_a + sin_b dy_b, dx_b = cos_b dy_b - sin_a dy_a.


@triton.jit
def _rope_pairs(HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    i = tl.arange(0, HEAD_DIM // 2)
    if INTERLEAVED:
        a, b = 2 * i, 2 * i + 1
    else:
        a, b = i, i + HEAD_DIM // 2
    return a, b


@triton.jit
def _rotate(xa, xb, cos_a, sin_a, cos_b, sin_b, INVERSE: tl.constexpr):
    if INVERSE:
        ya, yb = cos_a * xa + sin_b * xb, cos_b * xb - sin_a * xa
    else:
        ya, yb = cos_a * xa - sin_a * xb, cos_b * xb + sin_b * xa
    return ya, yb


@triton.jit
def _rope_tokens(FREQS, n_tokens, batch, stride_fs, stride_fb, HEAD_DIM: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr):
    """This program's BLOCK_T tokens of [s, b] (token n is s = n // batch, b = n % batch), the
    live mask, the pairs' indices and the cos / sin of their angles."""
    tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    live = (tok < n_tokens)[:, None]
    s, b = tok // batch, tok % batch
    a, bb = _rope_pairs(HEAD_DIM, INTERLEAVED)
    f = FREQS + s[:, None] * stride_fs + b[:, None] * stride_fb
    ang_a = tl.load(f + a[None, :], mask=live, other=0.0)
    ang_b = tl.load(f + bb[None, :], mask=live, other=0.0)
    return tok, live, s, b, a, bb, tl.cos(ang_a), tl.sin(ang_a), tl.cos(ang_b), tl.sin(ang_b)


@triton.jit
def _rope_kernel(T, FREQS, OUT, n_tokens, batch, n_heads, stride_ts, stride_tb, stride_th,
                 stride_fs, stride_fb, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
                 INVERSE: tl.constexpr, BLOCK_T: tl.constexpr):
    """BLOCK_T tokens, all heads: t [s, b, h, d] (any strides, unit over d) -> contiguous OUT."""
    tok, live, s, b, a, bb, cos_a, sin_a, cos_b, sin_b = _rope_tokens(
        FREQS, n_tokens, batch, stride_fs, stride_fb, HEAD_DIM, INTERLEAVED, BLOCK_T)
    src = T + s[:, None] * stride_ts + b[:, None] * stride_tb
    dst = OUT + tok[:, None] * (n_heads * HEAD_DIM)
    for h in range(n_heads):
        xa = tl.load(src + h * stride_th + a[None, :], mask=live, other=0.0).to(tl.float32)
        xb = tl.load(src + h * stride_th + bb[None, :], mask=live, other=0.0).to(tl.float32)
        ya, yb = _rotate(xa, xb, cos_a, sin_a, cos_b, sin_b, INVERSE)
        tl.store(dst + h * HEAD_DIM + a[None, :], ya.to(OUT.dtype.element_ty), mask=live)
        tl.store(dst + h * HEAD_DIM + bb[None, :], yb.to(OUT.dtype.element_ty), mask=live)


def _rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool, inverse: bool) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    s, b, h, d = t.shape
    out = torch.empty(s, b, h, d, dtype=t.dtype, device=t.device)
    stride_fs = freqs.stride(0) if freqs.shape[0] > 1 else 0
    stride_fb = freqs.stride(1) if freqs.shape[1] > 1 else 0
    block_t = 16
    _rope_kernel[(triton.cdiv(s * b, block_t),)](
        t, freqs, out, s * b, b, h, t.stride(0), t.stride(1), t.stride(2), stride_fs, stride_fb,
        HEAD_DIM=d, INTERLEAVED=bool(interleaved), INVERSE=inverse, BLOCK_T=block_t, num_warps=4)
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, freqs, interleaved):
        ctx.save_for_backward(freqs)
        ctx.interleaved = interleaved
        return _rope(t, freqs, interleaved, inverse=False)

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        return _rope(dy, freqs, ctx.interleaved, inverse=True), None, None


def rope_fusable(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """The kernel rotates whole heads of d (a power of two >= 16) with angles [s, 1 or b, 1, d]."""
    d = t.shape[-1]
    return (t.dim() == 4 and freqs.dim() == 4 and freqs.shape[-1] == d and freqs.shape[2] == 1
            and freqs.shape[0] in (1, t.shape[0]) and freqs.shape[1] in (1, t.shape[1])
            and d >= 16 and d & (d - 1) == 0)


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Megatron's ``_apply_rotary_pos_emb_bshd(t, freqs, interleaved)`` for t [s, b, h, d] and
    ``rope_fusable`` angles, in one pass each way (fp32 angles and math)."""
    return RoPEFunction.apply(t, freqs.to(torch.float32).contiguous(), interleaved)


def fused_apply_rotary_pos_emb(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False,
                               **unused) -> torch.Tensor:
    """Megatron's ``rope_utils.fused_apply_rotary_pos_emb`` hook: ours on CUDA where the kernel
    applies, Megatron's unfused RoPE otherwise (CPU, partial rotary)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    if t.is_cuda and rope_fusable(t, freqs):
        return apply_rope(t, freqs, interleaved)
    return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)


def fused_apply_rotary_pos_emb_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                                   cp_size: int = 1, cp_rank: int = 0, **unused) -> torch.Tensor:
    """Megatron's ``rope_utils.fused_apply_rotary_pos_emb_thd`` hook (packed documents, t
    [t, h, d]): positions restart in every document, per context-parallel rank as Megatron's
    unfused ``_apply_rotary_pos_emb_thd`` takes them; then the bshd kernel. Like
    TransformerEngine's, not interleaved (Megatron passes no such argument here)."""
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    seqlens = ((cu_seqlens[1:] - cu_seqlens[:-1]) // cp_size).tolist()
    exact = freqs.size(0) == cu_seqlens[-1]  # freqs of every packed position (Megatron's case 1)
    starts = cu_seqlens[:-1].tolist() if exact else [0] * len(seqlens)
    packed = torch.cat([_get_thd_freqs_on_this_cp_rank(cp_rank, cp_size, x, freqs, start)
                        for x, start in zip(torch.split(t, seqlens), starts)])
    return fused_apply_rotary_pos_emb(t.unsqueeze(1), packed).squeeze(1)


def install_fused_rope() -> None:
    """Make Megatron's ``apply_rope_fusion`` run our RoPE where TransformerEngine's is absent.

    Megatron-Core routes fused RoPE through two module globals of ``rope_utils`` (TE's
    functions, None without TE) and ``TransformerConfig`` refuses ``apply_rope_fusion`` while
    both are None. This is the one place that fills them; TE's stay when installed."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_apply_rotary_pos_emb
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = fused_apply_rotary_pos_emb_thd


# ---- QKV split + RoPE (inference: straight into the whole-prompt buffers) ----


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
    group, n_groups = tl.program_id(1), tl.num_programs(1)
    tok, m, s, b, a, bb, cos_a, sin_a, cos_b, sin_b = _rope_tokens(
        FREQS, n_tokens, batch, stride_fs, stride_fb, HEAD_DIM, INTERLEAVED, BLOCK_T)
    row = QKV + tok[:, None] * (n_groups * (PER_GROUP + 2) * HEAD_DIM) \
        + group * (PER_GROUP + 2) * HEAD_DIM
    for r in tl.static_range(PER_GROUP + 2):
        if r < PER_GROUP:
            out = Q + b[:, None] * stride_qb + (group * PER_GROUP + r) * stride_qh \
                + s[:, None] * stride_qs
        elif r == PER_GROUP:
            out = K + b[:, None] * stride_kb + group * stride_kh + s[:, None] * stride_ks
        else:
            out = V + b[:, None] * stride_vb + group * stride_vh + s[:, None] * stride_vs
        xa = tl.load(row + r * HEAD_DIM + a[None, :], mask=m, other=0.0)
        xb = tl.load(row + r * HEAD_DIM + bb[None, :], mask=m, other=0.0)
        if r < PER_GROUP + 1:  # queries and the key are rotated, the value is not
            ya, yb = _rotate(xa.to(tl.float32), xb.to(tl.float32), cos_a, sin_a, cos_b, sin_b,
                             False)
            xa, xb = ya, yb
        tl.store(out + a[None, :], xa.to(out.dtype.element_ty), mask=m)
        tl.store(out + bb[None, :], xb.to(out.dtype.element_ty), mask=m)


def split_qkv_rope(qkv: torch.Tensor, freqs: torch.Tensor, groups: int, per_group: int, d: int,
                   rotary_interleaved: bool, out=None):
    """Megatron's fused QKV projection output qkv [s, b, groups * (per_group + 2) * d] -> q
    [b, heads, s, d] and k/v [b, groups, s, d], RoPE on q and k (forward only). ``out``: views
    with unit stride over d to write into (e.g. whole-prompt buffers' [:, :, start:end]).
    ``freqs`` (float32 angles) broadcasts to [b, 1, s, d]."""
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


# ---- SwiGLU on Megatron's fc1 output [..., 2F]: silu(first half, the gate) * second half ----


@triton.jit
def _swiglu_fwd_kernel(X, Y, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, X, DX, n_cols, BLOCK: tl.constexpr):
    """d gate = dy * up * sig(gate) * (1 + gate * (1 - sig(gate))), d up = dy * silu(gate)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dy * gate * sig
    tl.store(DX + row * 2 * n_cols + cols, d_gate.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * 2 * n_cols + n_cols + cols, d_up.to(DX.dtype.element_ty), mask=mask)


_SWIGLU_BLOCK = 1024


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        n = x.shape[-1] // 2
        rows = x.numel() // (2 * n)
        y = x.new_empty(*x.shape[:-1], n)
        _swiglu_fwd_kernel[(rows, triton.cdiv(n, _SWIGLU_BLOCK))](x, y, n, BLOCK=_SWIGLU_BLOCK)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        n = x.shape[-1] // 2
        rows = x.numel() // (2 * n)
        dx = torch.empty_like(x)
        _swiglu_bwd_kernel[(rows, triton.cdiv(n, _SWIGLU_BLOCK))](dy.contiguous(), x, dx, n,
                                                                  BLOCK=_SWIGLU_BLOCK)
        return dx


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of x [..., 2F] = cat(gate, up) (Megatron's fc1 order), one pass each way."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dim (gate and up halves), got {x.shape[-1]}")
    return SwiGLUFunction.apply(x)
