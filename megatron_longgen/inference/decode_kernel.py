"""Split-K (flash-decoding) attention of one new token per sequence over a compact KV cache.

Decode is bound by reading the cache, so the work is spread over ``num_splits`` programs per
(sequence, KV head), each reading a contiguous range of slots and keeping its own softmax
statistics; a second kernel merges the splits and the new token's own key. One program serves
all query heads of a GQA group, so K/V are read once per KV head and never expanded.

Slots hold their token's global position (-1 = empty). Sparse layers read every slot and mask
it with the pattern's rule at the stored position (the cache holds exactly what the next query
reads, so the rule is a safeguard, not a filter). Full layers store token ``p`` in slot ``p``:
they read slots ``[0, length)`` only and need no positions, which is the flash-decoding path.

The new token is not in the cache yet: it attends to itself in the merge step, and the caller
writes it afterwards (writing first could evict a key it still reads, e.g. the oldest token of
an AttnSink window).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_longgen.attention.patterns import Pattern
from megatron_longgen.attention.triton_kernels.kernels import _allowed
from megatron_longgen.attention.triton_kernels.layout import pattern_params

LOG2E = math.log2(math.e)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs():
    if INTERPRET:  # small tiles: tests cover several tiles and splits on tiny caches
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
            for n in (64, 128) for w in (4, 8) for s in (2, 3, 4)]


@triton.jit
def _readable(q_pos, k_pos, head_off, p0, p1, p2, p3, PATTERN: tl.constexpr):
    """The training kernels' pattern rule for one query position, on held slots only."""
    return (k_pos >= 0) & _allowed(q_pos, k_pos, 0, 0, head_off, p0, p1, p2, p3, PATTERN, False)


@triton.autotune(configs=_configs(), key=["slots_bucket", "group", "PATTERN", "FULL_SLOTS",
                                          "HEAD_DIM"])
@triton.jit
def _decode_split_kernel(
    Q, K, V, POS, LENGTHS, HEAD_OFF, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_pb, stride_ph,
    num_kv_heads, num_slots, group, num_splits, slots_bucket, scale_log2, p0, p1, p2, p3,
    PATTERN: tl.constexpr, FULL_SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Partial attention of one split of the slots of one (sequence, KV head): the output
    normalised by its own sum, and its log-sum-exp (base 2; -inf when it read nothing)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_kv_heads).to(tl.int64)
    hk = (bh % num_kv_heads).to(tl.int64)
    q_pos = tl.load(LENGTHS + b)  # the new token's position = tokens already seen
    if FULL_SLOTS:
        n = q_pos.to(tl.int32)  # slot = position: [0, length) is exactly what is held
    else:
        n = num_slots
    per_split = tl.cdiv(tl.cdiv(n, num_splits), BLOCK_N) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = hk * group + offs_g
    g_valid = offs_g < group
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_valid[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    pos_base = POS + b * stride_pb + hk * stride_ph
    head_off = 0
    if PATTERN == 2:
        head_off = tl.load(HEAD_OFF + hk)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs = start + offs_n
        in_range = offs < hi
        k = tl.load(k_base + offs[:, None] * stride_ks + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        if FULL_SLOTS:
            ok = in_range
        else:
            k_pos = tl.load(pos_base + offs, mask=in_range, other=-1)
            ok = in_range & _readable(q_pos, k_pos, head_off, p0, p1, p2, p3, PATTERN)
        qk = tl.where(ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing readable yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs[:, None] * stride_vs + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    row = (b * num_kv_heads * group + heads) * num_splits + split  # [b, hq, split]
    tl.store(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=g_valid[:, None])
    tl.store(LSE_PART + row, lse, mask=g_valid)


@triton.jit
def _decode_merge_kernel(
    O_PART, LSE_PART, Q, K_NEW, V_NEW, OUT,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob, stride_oh,
    num_heads, group, num_splits, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Merge the splits of one (sequence, query head) with the new token's own key/value."""
    bh = tl.program_id(0)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    hk = h // group
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < num_splits

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32)
    k_new = tl.load(K_NEW + b * stride_kb + hk * stride_kh + offs_d).to(tl.float32)
    v_new = tl.load(V_NEW + b * stride_vb + hk * stride_vh + offs_d).to(tl.float32)
    self_score = tl.sum(q * k_new, 0) * scale_log2  # every pattern lets a token read itself

    row = bh.to(tl.int64) * num_splits + offs_s
    lse = tl.load(LSE_PART + row, mask=s_valid, other=float("-inf"))
    o = tl.load(O_PART + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_valid[:, None],
                other=0.0)
    m = tl.maximum(tl.max(lse, 0), self_score)
    w = tl.math.exp2(lse - m)  # empty splits weigh 0
    w_self = tl.math.exp2(self_score - m)
    out = (tl.sum(w[:, None] * o, 0) + w_self * v_new) / (tl.sum(w, 0) + w_self)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, slots: int, device) -> int:
    """Enough splits to fill the GPU about four times over, but at least 256 slots each."""
    programs = 4 * _multiprocessors(torch.device(device))
    want = triton.cdiv(programs, batch * kv_heads)
    return max(1, min(want, triton.cdiv(slots, 256)))


def decode_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos_cache: torch.Tensor,
    lengths: torch.Tensor,
    pattern: Pattern,
    head_offsets: torch.Tensor,
    scale: float,
    full_slots: bool,
    num_splits: Optional[int] = None,
) -> torch.Tensor:
    """Attention of the new token of each sequence over its cache plus itself.

    q [b, hq, d]; k_new/v_new [b, hkv, d] (the new token, not yet in the cache);
    k_cache/v_cache [b, hkv, slots, d]; pos_cache [b, hkv, slots] (-1 = empty); lengths [b]
    (tokens already seen = the new token's position); head_offsets [hkv] int32 (BlockSparse
    vertical offsets, else ignored); ``full_slots``: slot == position, read ``[0, length)``.
    Returns [b, hq, d] in q's dtype. Issues no host synchronisation (CUDA-graph safe).
    """
    b, hq, d = q.shape
    hkv, slots = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} is not supported by the decode kernel (a power of two >= 16)")
    for t in (q, k_new, v_new, k_cache, v_cache):
        if t.stride(-1) != 1:
            raise ValueError("decode attention needs the head dim contiguous")
    group = hq // hkv
    splits = num_splits or default_num_splits(b, hkv, slots, q.device)
    kind, p0, p1, p2, p3 = pattern_params(pattern)
    o_part = torch.empty(b, hq, splits, d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(b, hq, splits, device=q.device, dtype=torch.float32)
    scale_log2 = scale * LOG2E
    _decode_split_kernel[(splits, b * hkv)](
        q, k_cache, v_cache, pos_cache, lengths, head_offsets, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        pos_cache.stride(0), pos_cache.stride(1),
        hkv, slots, group, splits, triton.next_power_of_2(slots), scale_log2, p0, p1, p2, p3,
        PATTERN=kind, FULL_SLOTS=full_slots, HEAD_DIM=d,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = torch.empty_like(q)
    _decode_merge_kernel[(b * hq,)](
        o_part, lse_part, q, k_new, v_new, out,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0),
        v_new.stride(1), out.stride(0), out.stride(1),
        hq, group, splits, scale_log2,
        HEAD_DIM=d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )
    return out
