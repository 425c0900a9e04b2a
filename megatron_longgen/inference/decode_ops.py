"""Fused Triton kernels of one decode step (one new token per sequence, batch 1..16).

A decode step is bound by reading memory: every weight matrix once, plus the caches. At
batch 1 the matrix products are matrix-vector products, and in plain torch each layer also
ran some forty small kernels around them (RoPE in four elementwise passes, the one-token cache
write as a chain of gathers, wheres and scatters, the residual adds and norms), each a few
microseconds even when replayed as a CUDA graph. Here each layer runs:

* ``rope_qkv``: the head split of the fused QKV projection with RoPE, the angles read from
  the model's table at each sequence's position; for full layers it also writes the new K/V
  into the cache (slot = position, nothing is evicted, and the attention reads the slots before
  it only);
* ``write_token``: the sparse layers' cache write after attention (the new token may take the
  slot of a key the attention still reads): evicts what no future query reads and stores the
  token where the layout puts it, one program per (sequence, KV head) (any layer kind: full
  layers whose QKV the RoPE kernel cannot take use it too);
* ``swiglu_mlp``: gate and up projections in one pass over the fused fc1 weight with SwiGLU
  applied before the store, so the [b, 2F] intermediate never exists; then the down
  projection;
* ``add_norm``: the residual add fused with the next RMSNorm (the layer's pre-MLP norm, the
  next layer's input norm, or the final norm), writing both the residual and the normed rows.

The gate/up kernel is ``gemv``, a matrix-vector kernel (batch <= 16 rows padded to one
tensor-core product) that also serves the QKV, output and down projections (``linear``). On
CUDA each product is timed once per shape against the module's cuBLAS product (and, for
gate/up, its SwiGLU kernel) in the eager first step, and the faster runs (``GEMV_TIMINGS``).
``fusable_*`` says where a kernel computes exactly what the module does (one rank, no bias,
nothing fused into the linear layer); the fast path runs the module otherwise.
Every op has fixed shapes and no host synchronisation, so the step stays graph-capturable.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_longgen.inference import fused_ops
from megatron_longgen.inference.kv_cache import BlockSlots, FullSlots, LayerCache, SinkSlots

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BATCH = 16  # the matrix-vector kernel pads the batch to 16 rows of one tensor-core product


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- residual add + RMSNorm ----


@triton.jit
def _add_norm_kernel(X, Y, W, H, n_cols, eps, BLOCK: tl.constexpr):
    """X += Y (rounded to X's dtype, as the residual add is), H = RMSNorm(X) * W."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + y).to(X.dtype.element_ty)
    tl.store(X + row * n_cols + cols, s, mask=mask)
    s = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + row * n_cols + cols, (s * rstd * w).to(H.dtype.element_ty), mask=mask)


def add_norm(x: torch.Tensor, out: torch.Tensor, bias: Optional[torch.Tensor],
             norm_module) -> Tuple[torch.Tensor, torch.Tensor]:
    """The residual ``x + out (+ bias)`` and ``norm_module`` of it; x is updated in place
    where the kernel applies (a contiguous x and a ``fused_ops.fusable_norm`` module)."""
    if bias is not None:
        out = out + bias
    if not (fused_ops.fusable_norm(norm_module) and x.is_contiguous()):
        x = x + out
        return x, norm_module(x)
    n = x.shape[-1]
    eps = norm_module.eps if norm_module.eps is not None else torch.finfo(x.dtype).eps
    y = out.contiguous()
    h = torch.empty_like(x)
    _add_norm_kernel[(x.numel() // n,)](x, y, norm_module.weight, h, n, eps,
                                        BLOCK=triton.next_power_of_2(n),
                                        num_warps=8 if n >= 4096 else 4)
    return x, h


# ---- QKV head split + RoPE (+ the full layers' cache write) ----


@triton.jit
def _rope_qkv_kernel(
    QKV, ROPE, LENGTHS, Q, K_NEW, V_NEW, K_CACHE, V_CACHE, POS_CACHE,
    stride_qkv, stride_ck_b, stride_ck_h, stride_ck_s, stride_cv_b, stride_cv_h, stride_cv_s,
    stride_cp_b, stride_cp_h, max_pos,
    PER_GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
):
    """One program: one sequence x one query group ([PER_GROUP query heads, k, v] rows of
    Megatron's fused layout)."""
    b = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    n_groups = tl.num_programs(1)
    p = tl.load(LENGTHS + b)  # the new token's position
    d = tl.arange(0, HEAD_DIM)
    if INTERLEAVED:  # pairs (2i, 2i + 1)
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
    else:  # pairs (i, i + d/2)
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
    angle = tl.load(ROPE + tl.minimum(p, max_pos) * HEAD_DIM + d)  # float32 angles
    cos, sin = tl.cos(angle), tl.sin(angle) * sign
    row = QKV + b * stride_qkv + group * (PER_GROUP + 2) * HEAD_DIM
    for r in tl.static_range(PER_GROUP + 2):
        x = tl.load(row + r * HEAD_DIM + d)
        if r < PER_GROUP + 1:  # queries and the key are rotated, the value is not
            xp = tl.load(row + r * HEAD_DIM + partner)
            x = x.to(tl.float32) * cos + xp.to(tl.float32) * sin
        if r < PER_GROUP:
            tl.store(Q + (b * n_groups * PER_GROUP + group * PER_GROUP + r) * HEAD_DIM + d,
                     x.to(Q.dtype.element_ty))
        elif r == PER_GROUP:
            tl.store(K_NEW + (b * n_groups + group) * HEAD_DIM + d, x.to(K_NEW.dtype.element_ty))
            if WRITE_CACHE:
                tl.store(K_CACHE + b * stride_ck_b + group * stride_ck_h + p * stride_ck_s + d,
                         x.to(K_CACHE.dtype.element_ty))
        else:
            tl.store(V_NEW + (b * n_groups + group) * HEAD_DIM + d, x.to(V_NEW.dtype.element_ty))
            if WRITE_CACHE:
                tl.store(V_CACHE + b * stride_cv_b + group * stride_cv_h + p * stride_cv_s + d,
                         x.to(V_CACHE.dtype.element_ty))
                tl.store(POS_CACHE + b * stride_cp_b + group * stride_cp_h + p, p)


def rope_qkv(attn, qkv: torch.Tensor, rope: torch.Tensor, lengths: torch.Tensor,
             rotary_interleaved: bool, full_cache: Optional[LayerCache] = None):
    """q [b, heads, d], k/v [b, groups, d] from the fused QKV projection ``qkv`` [1, b, ...]
    of one token per sequence, q and k rotated by the angles ``rope[lengths]`` (the model's
    float32 table [max_length, d]). ``full_cache``: a full layer's cache, into which the new
    K/V go at slot = position."""
    groups = attn.num_query_groups_per_partition
    per_group = attn.num_attention_heads_per_partition // groups
    d = attn.hidden_size_per_attention_head
    qkv = qkv.reshape(qkv.shape[-2], -1)
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    b = qkv.shape[0]
    q = qkv.new_empty(b, groups * per_group, d)
    k, v = qkv.new_empty(b, groups, d), qkv.new_empty(b, groups, d)
    c = full_cache
    if c is not None:
        assert isinstance(c.layout, FullSlots) and c.k.stride(-1) == 1 and c.v.stride(-1) == 1
        caches = (c.k, c.v, c.pos)
        strides = (*c.k.stride()[:3], *c.v.stride()[:3], *c.pos.stride()[:2])
    else:
        caches, strides = (k, v, lengths), (0,) * 8  # not written
    _rope_qkv_kernel[(b, groups)](
        qkv, rope, lengths, q, k, v, *caches, qkv.stride(0), *strides, rope.shape[0] - 1,
        PER_GROUP=per_group, HEAD_DIM=d, INTERLEAVED=bool(rotary_interleaved),
        WRITE_CACHE=c is not None, num_warps=1 if d <= 64 else 2)
    return q, k, v


def fusable_rope(attn, rope: torch.Tensor) -> bool:
    """The QKV kernel's conditions (no q/k norm, no bias, whole-head RoPE), angles float32."""
    return fused_ops.fusable_qkv(attn, rope[None, None, :1]) and rope.dtype == torch.float32 \
        and rope.is_contiguous()


# ---- the sparse layers' one-token cache write ----

FULL, SINK, BLOCK = 0, 1, 2


@triton.jit
def _keep(pos, length, off, sink, window, block, local_blocks, stride, period,
          KIND: tl.constexpr):
    """``layout.keep`` (kv_cache.py): whether a future query (position >= length) reads the
    token at ``pos``."""
    if KIND == 0:
        ok = pos >= 0
    elif KIND == 1:
        ok = (pos < sink) | (length - pos < window)
    else:
        kb = pos // block
        ok = (length // block - kb < local_blocks) | ((kb + 1 + off) % stride % period == 0)
    return (pos >= 0) & ok


@triton.jit
def _slot(pos, off, sink, ring, block, local, stride, period, KIND: tl.constexpr):
    """``layout.slot`` (kv_cache.py) for a position >= 0."""
    if KIND == 0:
        slot = pos
    elif KIND == 1:
        slot = tl.where(pos < sink, pos, (pos - sink) % ring + sink)
    else:
        kb, inner = pos // block, pos % block
        per_stride = (stride + period - 1) // period
        n = kb + 1 + off  # vertical_index: vertical residues in [1 + off, kb + 1 + off)
        upto_n = n // stride * per_stride + (n % stride + period - 1) // period
        n0 = 1 + off
        upto_0 = n0 // stride * per_stride + (n0 % stride + period - 1) // period
        vertical = (local + upto_n - upto_0) * block + inner
        slot = tl.where(n % stride % period == 0, vertical, (kb % local) * block + inner)
    return slot


@triton.jit
def _write_token_kernel(
    K_NEW, V_NEW, LENGTHS, OFFSETS, K_CACHE, V_CACHE, POS_CACHE,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_pb, stride_ph,
    num_kv_heads, num_slots, ring_lo, ring_hi, sink, window, ring, block, local_blocks, local,
    stride, period,
    KIND: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (sequence, KV head): evict the ring slots no future query reads, then store the new
    token at its slot if a future query reads it."""
    bh = tl.program_id(0)
    b = (bh // num_kv_heads).to(tl.int64)
    h = (bh % num_kv_heads).to(tl.int64)
    p = tl.load(LENGTHS + b)
    length = p + 1
    off = tl.load(OFFSETS + h).to(tl.int64)
    pos_base = POS_CACHE + b * stride_pb + h * stride_ph
    for start in range(ring_lo, ring_hi, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        in_ring = offs < ring_hi
        held = tl.load(pos_base + offs, mask=in_ring, other=-1)
        gone = (held >= 0) & ~_keep(held, length, off, sink, window, block, local_blocks,
                                    stride, period, KIND)
        tl.store(pos_base + offs, tl.full([BLOCK_S], -1, tl.int64), mask=in_ring & gone)
    if _keep(p, length, off, sink, window, block, local_blocks, stride, period, KIND):
        slot = tl.minimum(_slot(p, off, sink, ring, block, local, stride, period, KIND),
                          num_slots - 1)
        d = tl.arange(0, HEAD_DIM)
        k = tl.load(K_NEW + (b * num_kv_heads + h) * HEAD_DIM + d)
        v = tl.load(V_NEW + (b * num_kv_heads + h) * HEAD_DIM + d)
        tl.store(K_CACHE + b * stride_kb + h * stride_kh + slot * stride_ks + d,
                 k.to(K_CACHE.dtype.element_ty))
        tl.store(V_CACHE + b * stride_vb + h * stride_vh + slot * stride_vs + d,
                 v.to(V_CACHE.dtype.element_ty))
        tl.store(pos_base + slot, p)


def write_params(lc: LayerCache) -> dict:
    """The layout's constants for ``write_token`` (computed once per cache, on the host)."""
    layout = lc.layout
    if isinstance(layout, SinkSlots):
        p = layout.pattern
        return dict(KIND=SINK, ring_lo=min(p.sink_tokens, layout.capacity),
                    ring_hi=layout.capacity, sink=p.sink_tokens, window=p.window_size,
                    ring=max(layout.ring, 1), block=1, local_blocks=0, local=1, stride=1,
                    period=1)
    if isinstance(layout, BlockSlots):
        p = layout.pattern
        return dict(KIND=BLOCK, ring_lo=0, ring_hi=layout.local * p.block_size, sink=0, window=0,
                    ring=1, block=p.block_size, local_blocks=p.local_blocks, local=layout.local,
                    stride=p.vert_stride, period=p.vert_period)
    assert isinstance(layout, FullSlots), layout
    return dict(KIND=FULL, ring_lo=0, ring_hi=0, sink=0, window=0, ring=1, block=1,
                local_blocks=0, local=1, stride=1, period=1)


def write_token(lc: LayerCache, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                offsets: torch.Tensor, params: dict) -> None:
    """``LayerCache.write`` of one token per sequence (k/v [b, kv_heads, d] contiguous, at
    positions ``lengths`` [b]) into a layer's cache; ``offsets`` [kv_heads] the
    vertical offsets, ``params`` from ``write_params``."""
    b, h, d = k.shape
    _write_token_kernel[(b * h,)](
        k, v, lengths, offsets, lc.k, lc.v, lc.pos, *lc.k.stride()[:3], *lc.v.stride()[:3],
        *lc.pos.stride()[:2], h, lc.pos.shape[2], HEAD_DIM=d,
        BLOCK_S=16 if INTERPRET else 1024, num_warps=4, **params)


# ---- matrix-vector products: the projections, and gate + up with SwiGLU in one read ----


def _gemv_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for n, k in ((16, 256), (16, 512), (32, 128), (32, 256), (64, 128))
            for w, s in ((4, 4), (8, 3))]


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "BLOCK_B", "SWIGLU"])
@triton.jit
def _gemv_kernel(
    X, W, Y, B, N, K, stride_xb, stride_wn, stride_yb,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIGLU: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Y = X @ W[:N].T for a block of N's rows per program; with SWIGLU, Y = silu(X @ W[:N].T)
    * (X @ W[N:2N].T): the gate row n and the up row N + n of the fused weight are read by
    the same program, once. B <= BLOCK_B rows of X (padded to one tensor-core product)."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_B)
    n_ok, b_ok = offs_n < N, offs_b < B
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    w_up = W + (N + offs_n).to(tl.int64)[:, None] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_b[:, None] * stride_xb + offs_k[None, :],
                    mask=b_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        if SWIGLU:
            wu = tl.load(w_up + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            up = tl.dot(x, tl.trans(wu), up, input_precision=DOT_PREC)
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * up
    tl.store(Y + offs_b[:, None] * stride_yb + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=b_ok[:, None] & n_ok[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """x [..., K] @ weight[:N].T -> [..., N] for at most ``MAX_BATCH`` rows of x; ``swiglu``:
    weight is [2N, K] (gate rows, then up rows) and the result silu(gate) * up."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows, n = x2.shape[0], weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = x2.new_empty(rows, n)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x2, weight, y, rows, n, x2.shape[1], x2.stride(0), weight.stride(0),
                       y.stride(0), BLOCK_B=max(16, triton.next_power_of_2(rows)),
                       SWIGLU=swiglu, DOT_PREC=_dot_precision(x.dtype))
    return y.view(*x.shape[:-1], n)


def _plain_weight(linear) -> bool:
    """A Megatron column/row-parallel linear whose whole product is ``x @ weight.T``: one
    rank (no reduction or gather), no bias, nothing fused in (e.g. Transformer Engine's norm)."""
    weight = getattr(linear, "weight", None)
    return (isinstance(linear, (ColumnParallelLinear, RowParallelLinear))
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(linear, "bias", None) is None
            and linear.config.tensor_model_parallel_size == 1
            and not getattr(linear.config, "sequence_parallel", False))


def fusable_linear(linear, rows: int) -> bool:
    return rows <= MAX_BATCH and _plain_weight(linear)


def fusable_mlp(mlp, rows: int) -> bool:
    """``fused_ops.fusable_mlp`` (SwiGLU without bias, clamp or offset) with a plain fc1
    weight (``_plain_weight``) and at most ``MAX_BATCH`` rows."""
    return fused_ops.fusable_mlp(mlp) and fusable_linear(mlp.linear_fc1, rows)


def swiglu_mlp(mlp, h: torch.Tensor):
    """``mlp(h)`` (output, bias) for h [1, b, hidden] of a ``fusable_mlp`` MLP: gate and up
    with SwiGLU in one kernel, then the down projection (``linear``)."""
    return linear(mlp.linear_fc2, gemv(h, mlp.linear_fc1.weight, swiglu=True))


# Per (product, weight shape, input shape, dtype, device): (kernel us, module us), timed once
# on CUDA, in the eager first decode step.
GEMV_TIMINGS: Dict[tuple, Tuple[float, float]] = {}


def linear(module, x: torch.Tensor):
    """``module(x)`` (output, bias) of one decode step's rows: ``gemv`` where it applies and,
    on CUDA, where it timed faster than the module's cuBLAS product."""
    if fusable_linear(module, x.numel() // x.shape[-1]) and _kernel_pays(
            "linear", module.weight, x, lambda: gemv(x, module.weight), lambda: module(x)):
        return gemv(x, module.weight), None
    return module(x)


def mlp(module, h: torch.Tensor):
    """The MLP of one decode step: the fused gate/up kernel where it applies and, on CUDA,
    where it timed faster than the module's product and SwiGLU kernel, else the module."""
    if fusable_mlp(module, h.numel() // h.shape[-1]) and _kernel_pays(
            "swiglu", module.linear_fc1.weight, h,  # the same down projection on both sides
            lambda: module.linear_fc2(gemv(h, module.linear_fc1.weight, swiglu=True)),
            lambda: fused_ops.swiglu_mlp(module, h)):
        return swiglu_mlp(module, h)
    if fused_ops.fusable_mlp(module):
        return fused_ops.swiglu_mlp(module, h)
    return module(h)


def _kernel_pays(product: str, weight: torch.Tensor, x: torch.Tensor, kernel, module) -> bool:
    if x.device.type != "cuda":
        return True  # the interpreter: nothing to time
    key = (product, tuple(weight.shape), tuple(x.shape), x.dtype, x.device)
    if key not in GEMV_TIMINGS:
        if torch.cuda.is_current_stream_capturing():
            return True  # timed outside a capture only: keep the kernel
        GEMV_TIMINGS[key] = (_cuda_us(kernel), _cuda_us(module))
    kernel_us, module_us = GEMV_TIMINGS[key]
    return kernel_us <= module_us


def _cuda_us(fn, reps: int = 20) -> float:
    """Mean microseconds of ``fn`` on the current stream (after warm-up: compiles, tunes)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps
