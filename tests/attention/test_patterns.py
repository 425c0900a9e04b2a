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


def vertical_residues(group, stride, groups, homo, rule):
    """Residues ``(kb + 1) % stride`` of the vertical blocks a query group reads, as sets."""
    if homo:
        return {0}
    if rule == "legacy":  # one residue per group, spread by stride // groups
        return {-(group * max(1, stride // groups)) % stride}
    # cover: multiples of the period, shifted back by the group index
    period = min(groups, stride)
    return {(m - group) % stride for m in range(0, stride, period)}


def block_sparse_rule(i, j, h, block, local, stride, homo, num_heads, groups, rule="cover"):
    if j > i:
        return False
    qb, kb = i // block, j // block
    if qb - kb < local:
        return True
    group = h // (num_heads // groups)
    return (kb + 1) % stride in vertical_residues(group, stride, groups, homo, rule)


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
@pytest.mark.parametrize("num_heads,groups,stride", [(4, 4, 3), (8, 2, 3), (6, 3, 3), (4, 1, 3),
                                                     (6, 3, 8), (8, 2, 4)])
@pytest.mark.parametrize("homo,rule", [(True, "cover"), (False, "cover"), (False, "legacy")])
def test_block_sparse_mask(seq_len, num_heads, groups, stride, homo, rule):
    block, local = 8, 2
    pattern = BlockSparsePattern(block, local, stride, homo, num_heads, groups, rule)
    heads = list(range(num_heads))
    mask = token_mask(pattern, seq_len, heads, num_heads=num_heads)
    ref = expected_mask(
        lambda i, j, h: block_sparse_rule(i, j, h, block, local, stride, homo, num_heads, groups,
                                          rule),
        seq_len, heads)
    assert torch.equal(mask.expand_as(ref), ref)


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 8, 32])
@pytest.mark.parametrize("stride", [1, 4, 8])
def test_cover_rule_reads_every_block_at_stated_cost(groups, stride):
    """Each group reads ceil(stride / groups) blocks in every ``stride``; together, all."""
    pattern = BlockSparsePattern(16, 1, stride, False, 2 * groups, groups)
    blocks = torch.arange(10 * stride)
    offsets = pattern.head_offsets(range(0, 2 * groups, 2))  # one head per group
    vertical = pattern.vertical(blocks[None], offsets[:, None])
    assert vertical.any(0).all()
    assert vertical.sum(1).tolist() == [10 * -(-stride // groups)] * groups
    # The GQA kernel, the CP plans and the per-KV-head caches rely on one pattern per group.
    assert torch.equal(pattern.head_offsets(range(1, 2 * groups, 2)), offsets)
    legacy = BlockSparsePattern(16, 1, stride, False, 2 * groups, groups, "legacy")
    if groups >= stride:  # enough groups for one residue each: the rules agree
        assert torch.equal(token_mask(pattern, 96, num_heads=2 * groups),
                           token_mask(legacy, 96, num_heads=2 * groups))


def test_legacy_rule_leaves_blocks_unread_with_few_groups():
    """What checkpoints trained before the rule was recorded did: 2 groups at stride 8 read
    residues 0 and 4 of (kb + 1) only."""
    pattern = BlockSparsePattern(16, 1, 8, False, 4, 2, "legacy")
    blocks = torch.arange(64)
    read = pattern.vertical(blocks[None], pattern.head_offsets([0, 2])[:, None]).any(0)
    assert torch.equal(read, ((blocks + 1) % 4 == 0))


def test_vertical_index_ranks_each_heads_vertical_blocks():
    for pattern in (BlockSparsePattern(16, 1, 8, False, 6, 3),
                    BlockSparsePattern(16, 1, 8, False, 4, 2, "legacy"),
                    BlockSparsePattern(16, 1, 3, True, 4, 4)):
        blocks = torch.arange(50)
        for offset in pattern.head_offsets(range(pattern.num_heads)).unique():
            vertical = pattern.vertical(blocks, offset)
            index = pattern.vertical_index(blocks[vertical], offset)
            assert index.tolist() == list(range(int(vertical.sum())))


def test_unknown_vert_stride_rule_is_refused():
    with pytest.raises(ValueError, match="vert_stride_rule"):
        BlockSparsePattern(16, 1, 8, vert_stride_rule="dense")


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
    BlockSparsePattern(16, 2, 8, False, 4, 2),
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
