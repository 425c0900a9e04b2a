"""FlexAttention backend on CPU: its mask_mod and block masks against the pattern's own
definitions, and eager flex_attention against the float64 reference."""

import pytest
import torch

from megatron_longgen.attention.flex import block_mask_for, flex_attention_backend, make_mask_mod
from megatron_longgen.attention.patterns import (
    EMPTY,
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    block_layout,
    token_mask,
)
from megatron_longgen.attention.reference import masked_attention

HETERO = BlockSparsePattern(block_size=16, local_blocks=2, vert_stride=3, homo_head=False,
                            num_heads=8, num_query_groups=4)
PATTERNS = {
    "causal": CausalPattern(),
    "sink": AttnSinkPattern(sink_tokens=4, window_size=20),
    "block_sparse_hetero": HETERO,
    "block_sparse_homo": BlockSparsePattern(16, 2, 4, homo_head=True, num_heads=8,
                                            num_query_groups=4),
    "block_sparse_cover_few_groups": BlockSparsePattern(16, 1, 8, homo_head=False, num_heads=8,
                                                        num_query_groups=4),
    "block_sparse_legacy_few_groups": BlockSparsePattern(16, 1, 8, homo_head=False, num_heads=8,
                                                         num_query_groups=4,
                                                         vert_stride_rule="legacy"),
}
DOCS = {"one_doc": None, "docs": [0, 7, 40, 41, 100]}


@pytest.mark.parametrize("docs", DOCS, ids=list(DOCS))
@pytest.mark.parametrize("name", PATTERNS, ids=list(PATTERNS))
def test_mask_mod_equals_token_mask(name, docs):
    pattern, seq_len, heads = PATTERNS[name], 100, torch.arange(2, 6)  # a TP slice of 8 heads
    cu = DOCS[docs]
    mask_mod = make_mask_mod(pattern, heads, seq_len, tuple(cu) if cu else None, "cpu")
    q_idx, kv_idx = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    got = torch.stack([mask_mod(0, torch.tensor(h), q_idx, kv_idx) for h in range(len(heads))])
    want = token_mask(pattern, seq_len, heads, cu_seqlens=torch.tensor(cu) if cu else None,
                      num_heads=8)
    assert torch.equal(got, want.expand_as(got))


@pytest.mark.parametrize("name", PATTERNS, ids=list(PATTERNS))
def test_block_mask_visits_the_layout_tiles(name):
    pattern, seq_len, heads = PATTERNS[name], 256, torch.arange(4, 8)
    block_mask = block_mask_for(pattern, seq_len, heads, None, "cpu", block_size=32)
    visited = block_mask.to_dense()[0].bool()  # [H or 1, nq, nk]
    want = block_layout(pattern, seq_len, 32, 32, heads) != EMPTY
    assert visited.shape[0] == (4 if pattern.head_dependent else 1)
    assert torch.equal(visited, want)


@pytest.mark.parametrize("docs", DOCS, ids=list(DOCS))
@pytest.mark.parametrize("name", ["sink", "block_sparse_hetero"])
def test_eager_flex_matches_reference(name, docs):
    pattern, seq_len, heads = PATTERNS[name], 100, torch.arange(4, 8)
    cu = torch.tensor(DOCS[docs]) if DOCS[docs] else None
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, seq_len, 16, generator=g)
    k, v = torch.randn(2, 1, 2, seq_len, 16, generator=g)
    out = flex_attention_backend(q, k, v, pattern=pattern, heads=heads, scale=0.25,
                                 cu_seqlens=cu)
    mask = token_mask(pattern, seq_len, heads, cu_seqlens=cu, num_heads=8)
    ref, _ = masked_attention(q.double(), k.double(), v.double(), mask[None], 0.25)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
