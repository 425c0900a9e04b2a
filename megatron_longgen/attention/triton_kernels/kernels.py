"""Triton block-sparse flash attention: forward, dK/dV pass and dQ pass.

Scores live in base 2 (``scale_log2 = scale * log2(e)``) so the softmax uses ``exp2``; the
saved log-sum-exp is base 2 as well. K/V are indexed by the query head's group (GQA without
copies). Each program walks a compact list of tiles (see ``layout.py``) in two loops: first
the tiles whose pairs are all allowed, with no masks at all, then the tiles that need the
element mask (pattern edges, document edges, the sequence tail). Keeping the mask out of the
first loop keeps its body short and lets Triton pipeline it.
"""

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:
    # Triton 3.6's interpreter keeps scalars as 1-element arrays and turns a loop bound into an
    # int with int(array), which numpy >= 2.4 refuses; convert the single element instead.
    from triton.runtime import interpreter as _interp

    _patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor_scalar_index(tensor, scope):
        _patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor_scalar_index


@triton.jit
def _allowed(q_pos, k_pos, q_start, k_start, head_off, p0, p1, p2, p3,
             PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr):
    """The pattern's token predicate (``patterns.py``) on broadcastable position tensors."""
    if HAS_DOCS:  # positions restart at each document; no pair crosses documents
        q_rel = q_pos - q_start
        k_rel = k_pos - k_start
        ok = (q_start == k_start) & (k_pos <= q_pos)
    else:
        q_rel = q_pos
        k_rel = k_pos
        ok = k_pos <= q_pos
    if PATTERN == 1:  # sink tokens + sliding window
        ok = ok & ((k_rel < p0) | (q_rel - k_rel < p1))
    elif PATTERN == 2:  # block sparse: p0 block, p1 local blocks, p2 stride, p3 period
        q_blk = q_rel // p0
        k_blk = k_rel // p0
        ok = ok & ((q_blk - k_blk < p1) | ((k_blk + 1 + head_off) % p2 % p3 == 0))
    return ok


@triton.jit
def _doc_start(DOC_START, offs, valid, other, HAS_DOCS: tl.constexpr):
    """Start of each position's document (packed sequences); the position itself otherwise."""
    if HAS_DOCS:
        return tl.load(DOC_START + offs, mask=valid, other=other)
    return offs


# ---- forward ----


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, entries, lo, hi,
               offs_m, q_start, offs_n, offs_d, stride_ks, stride_vs, seq_len, DOC_START,
               head_off, scale_log2, p0, p1, p2, p3,
               PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(lo, hi):
        offs_k = tl.load(entries + i) * BLOCK_N + offs_n
        if MASKED:
            k_valid = offs_k < seq_len
            k = tl.load(k_base + offs_k[None, :] * stride_ks + offs_d[:, None],
                        mask=k_valid[None, :], other=0.0)
            v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :],
                        mask=k_valid[:, None], other=0.0)
        else:
            k = tl.load(k_base + offs_k[None, :] * stride_ks + offs_d[:, None])
            v = tl.load(v_base + offs_k[:, None] * stride_vs + offs_d[None, :])
        qk = tl.dot(q, k, input_precision=DOT_PREC)
        if MASKED:
            k_start = _doc_start(DOC_START, offs_k, k_valid, -1, HAS_DOCS)
            ok = _allowed(offs_m[:, None], offs_k[None, :], q_start[:, None], k_start[None, :],
                          head_off, p0, p1, p2, p3, PATTERN, HAS_DOCS) & k_valid[None, :]
            qk = tl.where(ok, qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        else:  # every pair allowed: no row can stay at -inf
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, ENTRIES, COUNTS, HEAD_OFF, DOC_START,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os,
    seq_len, num_heads, group, layout_per_head, num_rows, max_count,
    scale_log2, p0, p1, p2, p3,
    PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = h // group
    row = h * layout_per_head * num_rows + tile
    n_full = tl.load(COUNTS + 2 * row)
    count = tl.load(COUNTS + 2 * row + 1)
    entries = ENTRIES + row.to(tl.int64) * max_count

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    head_off = 0
    if PATTERN == 2:
        head_off = tl.load(HEAD_OFF + h)
    q_start = _doc_start(DOC_START, offs_m, m_valid, 0, HAS_DOCS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, entries, 0, n_full,
                               offs_m, q_start, offs_n, offs_d, stride_ks, stride_vs, seq_len,
                               DOC_START, head_off, scale_log2, p0, p1, p2, p3,
                               PATTERN, HAS_DOCS, False, BLOCK_N, DOT_PREC)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, entries, n_full, count,
                               offs_m, q_start, offs_n, offs_d, stride_ks, stride_vs, seq_len,
                               DOC_START, head_off, scale_log2, p0, p1, p2, p3,
                               PATTERN, HAS_DOCS, True, BLOCK_N, DOT_PREC)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_valid[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, lse, mask=m_valid)


# ---- backward: dK, dV (and optionally dQ) per key tile ----


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, entries, lo, hi,
                offs_n, n_valid, k_start, offs_m0, offs_d, stride_qs, stride_dos,
                seq_len, DOC_START, head_off, scale_log2, p0, p1, p2, p3,
                PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(lo, hi):
        offs_m = tl.load(entries + i) * BLOCK_M + offs_m0
        if MASKED:
            m_valid = offs_m < seq_len
            q_t = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None],
                          mask=m_valid[None, :], other=0.0)
            lse = tl.load(lse_base + offs_m, mask=m_valid, other=0.0)
        else:
            q_t = tl.load(q_base + offs_m[None, :] * stride_qs + offs_d[:, None])
            lse = tl.load(lse_base + offs_m)
        p_t = tl.math.exp2(tl.dot(k, q_t, input_precision=DOT_PREC) * scale_log2 - lse[None, :])
        if MASKED:
            q_start = _doc_start(DOC_START, offs_m, m_valid, 0, HAS_DOCS)
            ok = _allowed(offs_m[None, :], offs_n[:, None], q_start[None, :], k_start[:, None],
                          head_off, p0, p1, p2, p3, PATTERN, HAS_DOCS)
            p_t = tl.where(ok & m_valid[None, :] & n_valid[:, None], p_t, 0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :],
                         mask=m_valid[:, None], other=0.0)
            delta = tl.load(delta_base + offs_m, mask=m_valid, other=0.0)
        else:
            do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :])
            delta = tl.load(delta_base + offs_m)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
        dk = tl.dot(ds_t, tl.trans(q_t), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, ENTRIES, COUNTS, HEAD_OFF, DOC_START,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    seq_len, num_heads, num_kv_heads, group, layout_per_head, num_rows, max_count,
    scale, scale_log2, p0, p1, p2, p3,
    PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One key tile of one KV head: accumulate dK, dV over the query heads of its group and
    the query tiles that read it (the transposed list)."""
    tile = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // num_kv_heads).to(tl.int64)
    hk = bhk % num_kv_heads
    h0 = hk * group  # query heads of a group share their pattern and layout row
    row = h0 * layout_per_head * num_rows + tile
    n_full = tl.load(COUNTS + 2 * row)
    count = tl.load(COUNTS + 2 * row + 1)
    entries = ENTRIES + row.to(tl.int64) * max_count

    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < seq_len
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=n_valid[:, None], other=0.0)
    head_off = 0
    if PATTERN == 2:
        head_off = tl.load(HEAD_OFF + h0)
    k_start = _doc_start(DOC_START, offs_n, n_valid, -1, HAS_DOCS)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, group):
        h = h0 + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        stat = LSE + (b * num_heads + h) * seq_len
        delta = DELTA + (b * num_heads + h) * seq_len
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, stat, delta, entries,
                             0, n_full, offs_n, n_valid, k_start, offs_m0, offs_d, stride_qs,
                             stride_dos, seq_len, DOC_START, head_off, scale_log2,
                             p0, p1, p2, p3, PATTERN, HAS_DOCS, False, BLOCK_M, DOT_PREC)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, stat, delta, entries,
                             n_full, count, offs_n, n_valid, k_start, offs_m0, offs_d, stride_qs,
                             stride_dos, seq_len, DOC_START, head_off, scale_log2,
                             p0, p1, p2, p3, PATTERN, HAS_DOCS, True, BLOCK_M, DOT_PREC)

    out_off = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :]
    tl.store(DK + out_off, (dk * scale).to(DK.dtype.element_ty), mask=n_valid[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=n_valid[:, None])


# ---- backward: dQ per query tile ----


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, entries, lo, hi, offs_m, m_valid, q_start,
              offs_n0, offs_d, stride_ks, stride_vs, seq_len, DOC_START, head_off, scale_log2,
              p0, p1, p2, p3, PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    for i in range(lo, hi):
        offs_n = tl.load(entries + i) * BLOCK_N + offs_n0
        if MASKED:
            n_valid = offs_n < seq_len
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
                        mask=n_valid[:, None], other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None],
                          mask=n_valid[None, :], other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :])
            v_t = tl.load(v_base + offs_n[None, :] * stride_vs + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2 - lse[:, None])
        if MASKED:
            k_start = _doc_start(DOC_START, offs_n, n_valid, -1, HAS_DOCS)
            ok = _allowed(offs_m[:, None], offs_n[None, :], q_start[:, None], k_start[None, :],
                          head_off, p0, p1, p2, p3, PATTERN, HAS_DOCS)
            p = tl.where(ok & m_valid[:, None] & n_valid[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, ENTRIES, COUNTS, HEAD_OFF, DOC_START,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs, stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    seq_len, num_heads, group, layout_per_head, num_rows, max_count,
    scale, scale_log2, p0, p1, p2, p3,
    PATTERN: tl.constexpr, HAS_DOCS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One query tile of one head: dQ over the key tiles it reads (same list as forward)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = h // group
    row = h * layout_per_head * num_rows + tile
    n_full = tl.load(COUNTS + 2 * row)
    count = tl.load(COUNTS + 2 * row + 1)
    entries = ENTRIES + row.to(tl.int64) * max_count

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=m_valid[:, None], other=0.0)
    stat = bh.to(tl.int64) * seq_len
    lse = tl.load(LSE + stat + offs_m, mask=m_valid, other=0.0)
    delta = tl.load(DELTA + stat + offs_m, mask=m_valid, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    head_off = 0
    if PATTERN == 2:
        head_off = tl.load(HEAD_OFF + h)
    q_start = _doc_start(DOC_START, offs_m, m_valid, 0, HAS_DOCS)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, entries, 0, n_full, offs_m, m_valid,
                   q_start, offs_n0, offs_d, stride_ks, stride_vs, seq_len, DOC_START, head_off,
                   scale_log2, p0, p1, p2, p3, PATTERN, HAS_DOCS, False, BLOCK_N, DOT_PREC)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, entries, n_full, count, offs_m, m_valid,
                   q_start, offs_n0, offs_d, stride_ks, stride_vs, seq_len, DOC_START, head_off,
                   scale_log2, p0, p1, p2, p3, PATTERN, HAS_DOCS, True, BLOCK_N, DOT_PREC)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_valid[:, None])


@triton.jit
def _bwd_delta_kernel(O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_os,
                      stride_dob, stride_doh, stride_dos, seq_len, num_heads,
                      HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(O * dO) - dLSE (natural LSE), in float32: one read of O and dO."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = offs_m < seq_len
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=valid[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :],
                 mask=valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stat = bh.to(tl.int64) * seq_len + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + stat, mask=valid, other=0.0)
    tl.store(DELTA + stat, delta, mask=valid)
