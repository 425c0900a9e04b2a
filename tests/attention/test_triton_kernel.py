"""Triton block-sparse attention vs the float64 reference: output, LSE and all gradients.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before the kernels are defined), so sizes stay small. The interpreter has no working bf16
matrix product, so the half-precision check here uses fp16; bf16 is checked on GPU by
benchmarks/attention.py.
"""

import pytest
import torch

from megatron_longgen.attention.backends import resolve_backend
from megatron_longgen.attention.patterns import (
    EMPTY,
    FULL,
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    block_layout,
    token_mask,
)
from megatron_longgen.attention.reference import masked_attention
from megatron_longgen.attention.triton_kernels import Tiles, default_tiles, sparse_attention
from megatron_longgen.attention.triton_kernels.layout import tile_lists

# Unequal query/key tiles per pass, so a transposed or mixed-up tile size would show.
TILES = Tiles(fwd_m=32, fwd_n=16, dkdv_m=16, dkdv_n=32, dq_m=32, dq_n=16)
HETERO = BlockSparsePattern(block_size=16, local_blocks=2, vert_stride=3, homo_head=False,
                            num_heads=8, num_query_groups=4)
HOMO = BlockSparsePattern(block_size=16, local_blocks=2, vert_stride=4, homo_head=True,
                          num_heads=4, num_query_groups=2)
SINK = AttnSinkPattern(sink_tokens=4, window_size=20)
# Fewer query groups than the stride: 3 groups each read 3 blocks in every 8.
COVER = BlockSparsePattern(block_size=16, local_blocks=1, vert_stride=8, homo_head=False,
                           num_heads=6, num_query_groups=3)
LEGACY = BlockSparsePattern(block_size=16, local_blocks=1, vert_stride=4, homo_head=False,
                            num_heads=4, num_query_groups=2, vert_stride_rule="legacy")


def _inputs(hq, hkv, seq_len, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(1, h, seq_len, dim, generator=g).to(dtype)  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def _check(pattern, seq_len, hq, hkv, dim, heads, num_heads, cu=None, dtype=torch.float32,
           tol=1e-4, seed=0, tiles=TILES):
    q, k, v = [x.requires_grad_() for x in _inputs(hq, hkv, seq_len, dim, dtype, seed)]
    scale = dim ** -0.5
    out, lse = sparse_attention(q, k, v, pattern, heads, scale, cu_seqlens=cu, return_lse=True,
                                tiles=tiles)
    g = torch.Generator().manual_seed(seed + 1)
    d_out = torch.randn(out.shape, generator=g).to(dtype)
    d_lse = torch.randn(lse.shape, generator=g)  # context parallelism backprops through LSE
    ((out.float() * d_out.float()).sum() + (lse * d_lse).sum()).backward()

    mask = token_mask(pattern, seq_len, heads, cu_seqlens=cu, num_heads=num_heads)
    q64, k64, v64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = masked_attention(q64, k64, v64, mask[None], scale)
    ((ref_out * d_out.double()).sum() + (ref_lse * d_lse.double()).sum()).backward()

    for name, got, want in [("out", out, ref_out), ("lse", lse, ref_lse), ("dq", q.grad, q64.grad),
                            ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)]:
        assert torch.isfinite(got).all(), name
        err = (got.double() - want).norm() / want.norm()
        assert err < tol, f"{name}: relative error {err:.2e}"


CASES = {
    # pattern, seq_len, hq, hkv, dim, heads (global), num_heads, cu_seqlens
    "causal_odd_len_gqa": (CausalPattern(), 77, 4, 2, 16, range(4), 4, None),
    "sink_gqa4_d32": (SINK, 90, 4, 1, 32, range(4), 4, None),
    "block_sparse_hetero_tp_slice": (HETERO, 100, 4, 2, 16, range(4, 8), 8, None),
    "block_sparse_homo_exact_len": (HOMO, 64, 4, 2, 32, range(4), 4, None),
    "block_sparse_cover_few_groups": (COVER, 150, 6, 3, 16, range(6), 6, None),
    "block_sparse_legacy_few_groups": (LEGACY, 100, 4, 2, 16, range(4), 4, None),
    "causal_docs": (CausalPattern(), 70, 2, 1, 16, range(2), 2, [0, 23, 24, 70]),
    "sink_docs": (SINK, 90, 4, 2, 16, range(4), 4, [0, 7, 40, 41, 90]),
    "block_sparse_hetero_docs": (HETERO, 100, 4, 2, 16, range(2, 6), 8, [0, 37, 90, 100]),
    "sink_d64": (SINK, 40, 2, 2, 64, range(2), 2, None),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_matches_reference_fp32(case):
    pattern, seq_len, hq, hkv, dim, heads, num_heads, cu = CASES[case]
    cu = torch.tensor(cu) if cu is not None else None
    _check(pattern, seq_len, hq, hkv, dim, torch.tensor(list(heads)), num_heads, cu)


@pytest.mark.parametrize("pattern", [SINK, HETERO], ids=["sink", "block_sparse"])
def test_matches_reference_fp16(pattern):
    _check(pattern, 70, 4, 2, 32, torch.arange(4), 8, dtype=torch.float16, tol=1e-2, seed=3)


@pytest.mark.parametrize("case", ["sink_docs", "block_sparse_hetero_tp_slice"])
def test_tuned_gpu_tiles_match_reference(case):
    """The per-pattern tiles the kernels use in 16 bits on GPU (128-wide, unequal per pass)."""
    pattern, seq_len, hq, hkv, dim, heads, num_heads, cu = CASES[case]
    cu = torch.tensor(cu) if cu is not None else None
    tiles = default_tiles(pattern, torch.float16)
    assert tiles != TILES
    _check(pattern, seq_len, hq, hkv, dim, torch.tensor(list(heads)), num_heads, cu,
           dtype=torch.float16, tol=1e-2, tiles=tiles)


def test_strided_inputs():
    """Megatron hands over permuted [s, b, h, d] views; the kernels take strides as they are."""
    q, k, v = _inputs(2, 1, 50, 16, torch.float32, seed=5)
    as_sbhd = lambda x: x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # noqa: E731
    qs, ks, vs = map(as_sbhd, (q, k, v))
    assert not qs.is_contiguous()
    heads = torch.arange(2)
    out = sparse_attention(qs, ks, vs, SINK, heads, 0.25, tiles=TILES)
    ref = sparse_attention(q, k, v, SINK, heads, 0.25, tiles=TILES)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("transpose", [False, True])
def test_tile_lists_hold_exactly_the_nonempty_tiles(transpose):
    """Each row lists its non-empty tiles once: first the FULL ones inside the sequence (run
    without a mask), then every tile that needs the element mask."""
    seq_len, block_q, block_k = 100, 32, 16
    heads = torch.arange(4, 8)
    lists = tile_lists(HETERO, seq_len, heads, None, block_q, block_k, transpose, torch.device("cpu"))
    layout = block_layout(HETERO, seq_len, block_q, block_k, heads)
    q_tail = torch.arange(layout.shape[1]) * block_q + block_q > seq_len
    k_tail = torch.arange(layout.shape[2]) * block_k + block_k > seq_len
    unmasked = (layout == FULL) & ~q_tail[None, :, None] & ~k_tail[None, None, :]
    if transpose:
        layout, unmasked = layout.transpose(1, 2), unmasked.transpose(1, 2)
    assert lists.per_head and lists.entries.shape[0] == 4
    for h in range(4):
        for row in range(layout.shape[1]):
            n_full, n = lists.counts[h, row].tolist()
            listed = lists.entries[h, row, :n].tolist()
            assert sorted(listed) == (layout[h, row] != EMPTY).nonzero().flatten().tolist()
            assert sorted(listed[:n_full]) == unmasked[h, row].nonzero().flatten().tolist()


def test_backend_is_cuda_only():
    """On CPU ``auto`` keeps the reference; the Triton backend refuses CPU outside tests."""
    cpu = torch.device("cpu")
    assert resolve_backend("auto", SINK, cpu).name == "reference"
    with pytest.raises(ValueError):
        resolve_backend("triton", SINK, cpu)
    assert resolve_backend("auto", HETERO, torch.device("cuda")).name == "triton"
