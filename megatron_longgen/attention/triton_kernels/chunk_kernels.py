"""Triton flash attention of one context-parallel chunk pair: forward, dK/dV pass, dQ pass.

Unlike ``kernels.py`` (one sequence attending to itself), queries and keys come with explicit
global positions: ``QPOS`` [sq], ``KPOS`` [rows, sk] (one row shared by every KV head, or one
per KV head for the compact exchange layout), and with packed documents the start of each
position's document (``QSTART``, ``KSTART``). The pattern rule (``kernels._allowed``) is
evaluated at those positions, so a chunk holds any set of keys. A key slot past a row's end
holds position ``NO_KEY`` and start -1: no query may read it.

Scores are base 2 as in ``kernels.py``. Programs walk compact tile lists (``chunk_attention``
builds them from per-tile position bounds): unmasked tiles first, then masked ones. The
backward takes the LSE (base 2) and delta of the *final* merged output, so P is this pair's
slice of the whole softmax; dQ, dK and dV accumulate and are stored in float32.
"""

import triton
import triton.language as tl

from megatron_longgen.attention.triton_kernels.kernels import _allowed

NO_KEY = tl.constexpr(1 << 30)


@triton.jit
def _key_positions(KPOS, KSTART, offs_k, sk, HAS_DOCS: tl.constexpr):
    valid = offs_k < sk
    k_pos = tl.load(KPOS + offs_k, mask=valid, other=NO_KEY)
    if HAS_DOCS:
        k_start = tl.load(KSTART + offs_k, mask=valid, other=-1)
    else:
        k_start = k_pos
    return valid, k_pos, k_start


@triton.jit
def _query_positions(QPOS, QSTART, offs_m, sq, HAS_DOCS: tl.constexpr):
    valid = offs_m < sq
    q_pos = tl.load(QPOS + offs_m, mask=valid, other=0)
    if HAS_DOCS:
        q_start = tl.load(QSTART + offs_m, mask=valid, other=0)
    else:
        q_start = q_pos
    return valid, q_pos, q_start


@triton.jit
def _list_row(COUNTS, ENTRIES, row, max_count):
    n_full = tl.load(COUNTS + 2 * row)
    count = tl.load(COUNTS + 2 * row + 1)
    return n_full, count, ENTRIES + row.to(tl.int64) * max_count


# ---- forward ----


@triton.jit
def _chunk_fwd_tiles(acc, m_i, l_i, q, q_pos, q_start, k_base, v_base, kpos_base, kstart_base,
                     entries, lo, hi, offs_n, offs_d, stride_ks, stride_vs, sk,
                     head_off, scale_log2, p0, p1, p2, p3,
                     PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr,
                     BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(lo, hi):
        offs_k = tl.load(entries + i) * BLOCK_N + offs_n
        if MASKED:
            k_valid, k_pos, k_start = _key_positions(kpos_base, kstart_base, offs_k, sk, HAS_DOCS)
            k = tl.load(k_base + offs_k[None, :] * stride_ks + offs_d[:, None],
                        mask=k_valid[None, :], other=0.0)
            v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :],
                        mask=k_valid[:, None], other=0.0)
        else:
            k = tl.load(k_base + offs_k[None, :] * stride_ks + offs_d[:, None])
            v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :])
        qk = tl.dot(q, k, input_precision=DOT_PREC)
        if MASKED:
            ok = _allowed(q_pos[:, None], k_pos[None, :], q_start[:, None], k_start[None, :],
                          head_off, p0, p1, p2, p3, PATTERN, HAS_DOCS)
            qk = tl.where(ok, qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _chunk_fwd_kernel(
    Q, K, V, O, LSE, QPOS, QSTART, KPOS, KSTART, ENTRIES, COUNTS, HEAD_OFF,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    kpos_stride, sq, sk, num_heads, group, list_stride, max_count,
    scale_log2, p0, p1, p2, p3,
    PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One query tile of one head. ``list_stride``: tile-list rows per KV head (0: shared);
    ``kpos_stride``: KPOS elements per KV head (0: shared)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = h // group
    n_full, count, entries = _list_row(COUNTS, ENTRIES, hk * list_stride + tile, max_count)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid, q_pos, q_start = _query_positions(QPOS, QSTART, offs_m, sq, HAS_DOCS)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpos_base = KPOS + hk * kpos_stride
    kstart_base = KSTART + hk * kpos_stride
    head_off = 0
    if PATTERN == 2:
        head_off = tl.load(HEAD_OFF + h)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _chunk_fwd_tiles(acc, m_i, l_i, q, q_pos, q_start, k_base, v_base, kpos_base,
                                     kstart_base, entries, 0, n_full, offs_n, offs_d, stride_ks,
                                     stride_vs, sk, head_off, scale_log2, p0, p1, p2, p3,
                                     PATTERN, HAS_DOCS, False, BLOCK_N, DOT_PREC)
    acc, m_i, l_i = _chunk_fwd_tiles(acc, m_i, l_i, q, q_pos, q_start, k_base, v_base, kpos_base,
                                     kstart_base, entries, n_full, count, offs_n, offs_d, stride_ks,
                                     stride_vs, sk, head_off, scale_log2, p0, p1, p2, p3,
                                     PATTERN, HAS_DOCS, True, BLOCK_N, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + bh.to(tl.int64) * sq + offs_m, lse, mask=m_valid)


# ---- backward: dK, dV per key tile ----


@triton.jit
def _chunk_dkdv_tiles(dk, dv, k, v, k_pos, k_start, n_valid, q_base, do_base, lse_base,
                      delta_base, QPOS, QSTART, entries, lo, hi, offs_m0, offs_d, stride_qs,
                      stride_dos, sq, head_off, scale_log2, p0, p1, p2, p3,
                      PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr,
                      BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(lo, hi):
        offs_m = tl.load(entries + i) * BLOCK_M + offs_m0
        if MASKED:
            m_valid, q_pos, q_start = _query_positions(QPOS, QSTART, offs_m, sq, HAS_DOCS)
            q_t = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None],
                          mask=m_valid[None, :], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_valid, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :],
                         mask=m_valid[:, None], other=0.0)
            delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        else:
            q_t = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None])
            lse = tl.load(lse_base + offs_m)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :])
            delta = tl.load(delta_base + offs_m)
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PREC) * scale_log2 - lse[None, :])
        if MASKED:
            ok = _allowed(q_pos[None, :], k_pos[:, None], q_start[None, :], k_start[:, None],
                          head_off, p0, p1, p2, p3, PATTERN, HAS_DOCS)
            p_t = tl.where(ok & m_valid[None, :] & n_valid[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk = tl.dot(ds_t, tl.trans(q_t), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _chunk_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QPOS, QSTART, KPOS, KSTART, ENTRIES, COUNTS, HEAD_OFF,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    kpos_stride, sq, sk, num_heads, num_kv_heads, group, list_stride, max_count,
    scale, scale_log2, p0, p1, p2, p3,
    PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One key tile of one KV head: dK, dV over its group's query heads and the query tiles
    that read it (the transposed list)."""
    tile = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // num_kv_heads).to(tl.int64)
    hk = bhk % num_kv_heads
    h0 = hk * group
    n_full, count, entries = _list_row(COUNTS, ENTRIES, hk * list_stride + tile, max_count)

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid, k_pos, k_start = _key_positions(KPOS + hk * kpos_stride, KSTART + hk * kpos_stride,
                                             offs_n, sk, HAS_DOCS)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    head_off = 0
    if PATTERN == 2:
        head_off = tl.load(HEAD_OFF + h0)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, group):
        h = h0 + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * num_heads + h) * sq
        delta_base = DELTA + (b * num_heads + h) * sq
        dk, dv = _chunk_dkdv_tiles(dk, dv, k, v, k_pos, k_start, n_valid, q_base, do_base,
                                   lse_base, delta_base, QPOS, QSTART, entries, 0, n_full,
                                   offs_m0, offs_d, stride_qs, stride_dos, sq, head_off,
                                   scale_log2, p0, p1, p2, p3, PATTERN, HAS_DOCS, False,
                                   BLOCK_M, DOT_PREC)
        dk, dv = _chunk_dkdv_tiles(dk, dv, k, v, k_pos, k_start, n_valid, q_base, do_base,
                                   lse_base, delta_base, QPOS, QSTART, entries, n_full, count,
                                   offs_m0, offs_d, stride_qs, stride_dos, sq, head_off,
                                   scale_log2, p0, p1, p2, p3, PATTERN, HAS_DOCS, True,
                                   BLOCK_M, DOT_PREC)

    out_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    tl.store(DK + out_off, dk * scale, mask=n_valid[:, None])
    tl.store(DV + out_off, dv, mask=n_valid[:, None])


# ---- backward: dQ per query tile ----


@triton.jit
def _chunk_dq_tiles(dq, q, do, lse, delta, q_pos, q_start, m_valid, k_base, v_base, kpos_base,
                    kstart_base, entries, lo, hi, offs_n0, offs_d, stride_ks, stride_vs, sk,
                    head_off, scale_log2, p0, p1, p2, p3,
                    PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(lo, hi):
        offs_n = tl.load(entries + i) * BLOCK_N + offs_n0
        if MASKED:
            n_valid, k_pos, k_start = _key_positions(kpos_base, kstart_base, offs_n, sk, HAS_DOCS)
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
                        mask=n_valid[:, None], other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None],
                          mask=n_valid[None, :], other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :])
            v_t = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2 - lse[:, None])
        if MASKED:
            ok = _allowed(q_pos[:, None], k_pos[None, :], q_start[:, None], k_start[None, :],
                          head_off, p0, p1, p2, p3, PATTERN, HAS_DOCS)
            p = tl.where(ok & m_valid[:, None] & n_valid[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _chunk_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, QPOS, QSTART, KPOS, KSTART, ENTRIES, COUNTS, HEAD_OFF,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    kpos_stride, sq, sk, num_heads, group, list_stride, max_count,
    scale, scale_log2, p0, p1, p2, p3,
    PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One query tile of one head: dQ over the key tiles it reads (the forward's list)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = h // group
    n_full, count, entries = _list_row(COUNTS, ENTRIES, hk * list_stride + tile, max_count)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid, q_pos, q_start = _query_positions(QPOS, QSTART, offs_m, sq, HAS_DOCS)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=m_valid[:, None], other=0.0)
    stat = bh.to(tl.int64) * sq
    lse = tl.load(LSE + stat + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + stat + offs_m, mask=m_valid, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpos_base = KPOS + hk * kpos_stride
    kstart_base = KSTART + hk * kpos_stride
    head_off = 0
    if PATTERN == 2:
        head_off = tl.load(HEAD_OFF + h)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _chunk_dq_tiles(dq, q, do, lse, delta, q_pos, q_start, m_valid, k_base, v_base,
                         kpos_base, kstart_base, entries, 0, n_full, offs_n0, offs_d, stride_ks,
                         stride_vs, sk, head_off, scale_log2, p0, p1, p2, p3,
                         PATTERN, HAS_DOCS, False, BLOCK_N, DOT_PREC)
    dq = _chunk_dq_tiles(dq, q, do, lse, delta, q_pos, q_start, m_valid, k_base, v_base,
                         kpos_base, kstart_base, entries, n_full, count, offs_n0, offs_d, stride_ks,
                         stride_vs, sk, head_off, scale_log2, p0, p1, p2, p3,
                         PATTERN, HAS_DOCS, True, BLOCK_N, DOT_PREC)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq * scale, mask=m_valid[:, None])
