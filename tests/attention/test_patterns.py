"""Pattern masks vs an independent token-level definition written here, pair by pair."""

import itertools

import pytest
import torch

from megatron_longgen.attention.patterns import (
    EMPTY,
    FULL,
    PARTIAL,
    AttnSinkPattern,
    BlockSparsePattern,
    CausalPattern,
    allowed_pair_count,
    block_layout,
    token_mask,
)


def sink_rule(i, j, sink, window):
    return j <= i and (j < sink or i - j < window)


def block_sparse_rule(i, j, h, block, local, stride, homo, num_heads, groups):
    if j > i:
        return False
    qb, kb = i // block, j // block
    if qb - kb < local:
        return True
    group = h // (num_heads // groups)
    offset = 0 if homo else (group * max(1, stride // groups)) % stride
    return (kb + offset + 1) % stride == 0


def expected_mask(rule, seq_len, heads, docs=None):
    starts = [0] * seq_len
    ids = [0] * seq_len
    if docs is not None:
        for d, (a, b) in enumerate(zip(docs[:-1], docs[1:])):
            for t in range(a, b):
                starts[t], ids[t] = a, d
    out = torch.zeros(len(heads), seq_len, seq_len, dtype=torch.bool)
    for hi, h in enumerate(heads):
        for i, j in itertools.product(range(seq_len), repeat=2):
            if ids[i] == ids[j]:
                out[hi, i, j] = rule(i - starts[i], j - starts[j], h)
    return out


@pytest.mark.parametrize("seq_len", [1, 37, 64, 100])
@pytest.mark.parametrize("sink,window", [(0, 8), (4, 16), (3, 1), (8, 200)])
def test_attn_sink_mask(seq_len, sink, window):
    mask = token_mask(AttnSinkPattern(sink, window), seq_len)
    ref = expected_mask(lambda i, j, h: sink_rule(i, j, sink, window), seq_len, [0])
    assert torch.equal(mask, ref)


@pytest.mark.parametrize("seq_len", [16, 70, 129])
@pytest.mark.parametrize("num_heads,groups", [(4, 4), (8, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("homo", [True, False])
def test_block_sparse_mask(seq_len, num_heads, groups, homo):
    block, local, stride = 8, 2, 3
    pattern = BlockSparsePattern(block, local, stride, homo, num_heads, groups)
    heads = list(range(num_heads))
    mask = token_mask(pattern, seq_len, heads, num_heads=num_heads)
    ref = expected_mask(
        lambda i, j, h: block_sparse_rule(i, j, h, block, local, stride, homo, num_heads, groups),
        seq_len, heads)
    assert torch.equal(mask.expand_as(ref), ref)


def test_heterogeneous_heads_cover_every_block_and_gqa_groups_share():
    pattern = BlockSparsePattern(16, 1, 4, homo_head=False, num_heads=8, num_query_groups=4)
    mask = token_mask(pattern, 256, range(8), num_heads=8)
    assert mask.shape[0] == 8
    assert mask.any(0).equal(torch.ones(256, 256, dtype=torch.bool).tril())
    for g in range(4):  # query heads of one KV group share one pattern
        assert torch.equal(mask[2 * g], mask[2 * g + 1])
    assert not torch.equal(mask[0], mask[2])


def test_tensor_parallel_slice_keeps_global_head_pattern():
    pattern = BlockSparsePattern(8, 1, 4, False, num_heads=8, num_query_groups=8)
    full = token_mask(pattern, 64, range(8), num_heads=8)
    second_rank = token_mask(pattern, 64, [4, 5, 6, 7], num_heads=8)
    assert torch.equal(second_rank, full[4:])


def test_packed_documents_restart_positions_and_never_cross():
    pattern = AttnSinkPattern(2, 4)
    docs = [0, 5, 5, 17, 30]  # includes an empty document
    mask = token_mask(pattern, 30, cu_seqlens=torch.tensor(docs))
    ref = expected_mask(lambda i, j, h: sink_rule(i, j, 2, 4), 30, [0], docs)
    assert torch.equal(mask, ref)
    with pytest.raises(ValueError, match="cu_seqlens"):
        token_mask(pattern, 30, cu_seqlens=torch.tensor([0, 10, 20]))


def _layout_from_mask(mask, bq, bk):
    h, L, _ = mask.shape
    nq, nk = -(-L // bq), -(-L // bk)
    out = torch.empty(h, nq, nk, dtype=torch.int8)
    for a, b in itertools.product(range(nq), range(nk)):
        tile = mask[:, a * bq:(a + 1) * bq, b * bk:(b + 1) * bk].flatten(1)
        out[:, a, b] = torch.where(tile.all(1), FULL, torch.where(tile.any(1), PARTIAL, EMPTY))
    return out


@pytest.mark.parametrize("pattern", [
    CausalPattern(),
    AttnSinkPattern(4, 20),
    AttnSinkPattern(0, 7),
    BlockSparsePattern(16, 2, 3, False, 4, 2),
    BlockSparsePattern(16, 1, 2, True, 4, 4),
], ids=lambda p: repr(p))
@pytest.mark.parametrize("seq_len,bq,bk", [(96, 16, 16), (100, 32, 16), (77, 16, 32), (130, 32, 32), (64, 8, 8)])
def test_block_layout_matches_token_mask(pattern, seq_len, bq, bk):
    heads = list(range(4))
    mask = token_mask(pattern, seq_len, heads, num_heads=4)
    layout = block_layout(pattern, seq_len, bq, bk, heads, num_heads=4)
    assert torch.equal(layout, _layout_from_mask(mask, bq, bk))


@pytest.mark.parametrize("pattern", [
    CausalPattern(), AttnSinkPattern(5, 11), BlockSparsePattern(16, 2, 3, False, 4, 4)])
def test_allowed_pair_count(pattern):
    mask = token_mask(pattern, 90, range(4), num_heads=4)
    assert allowed_pair_count(pattern, 90, range(4), num_heads=4) == int(mask.expand(4, -1, -1).sum())
